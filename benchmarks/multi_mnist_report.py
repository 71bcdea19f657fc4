"""The MultiMNIST report: `benchmarks/multi_mnist.py`'s results beside the
paper's Table 3, as Markdown, and the accuracy profile (Figure 3) as a PNG.

For each method: mean ± standard deviation over seeds (population std; a
single seed shows no ±) of left/right test accuracy with honest selection
(best validation epoch) and with the authors' selection (best test epoch),
the seeds, and seconds per training epoch (median over runs, on the machine
and backend the runs record; runs that shared the CPU with other jobs are
slower, so compare within one campaign only).

Usage:
    python benchmarks/multi_mnist_report.py benchmarks/results/multi_mnist.json \\
        --figure docs/results/multi_mnist_profile.png
"""

import argparse
import json

import numpy as np

# Sener & Koltun (NeurIPS 2018), Table 3: MultiMNIST left/right accuracy (%).
PAPER = {
    "single_task": (97.23, 95.90),
    "uniform": (96.46, 94.99),
    "uncertainty": (96.47, 95.29),
    "gradnorm": (96.27, 94.84),
    "mgda_ub": (97.26, 95.90),
}


def _cell(mean, std, seeds):
    if mean is None:
        return "-"
    mean, std = 100 * np.asarray(mean), 100 * np.asarray(std)  # fractions -> percent
    if seeds > 1:
        return f"{mean[0]:.2f} ± {std[0]:.2f} / {mean[1]:.2f} ± {std[1]:.2f}"
    return f"{mean[0]:.2f} / {mean[1]:.2f}"


def _summary(runs, selection):
    import keras_mgda as km  # late: --help without Keras

    return km.plots.summarize(runs, selection=selection)


def _key(run):
    weights = run.get("weights")
    return run["method"], tuple(weights.values()) if weights else None


def _seconds_per_epoch(runs):
    """The median over each method's (each grid point's) runs: one run that
    shared the CPU does not move it, where it would move a mean."""
    out = {}
    for run in runs:
        out.setdefault(_key(run), []).append(run["seconds_per_epoch"])
    return {key: float(np.median(values)) for key, values in out.items()}


def table(runs):
    """The Markdown table: paper, honest, authors' selection, seeds, s/epoch."""
    honest, authors = _summary(runs, "honest"), _summary(runs, "authors")
    seconds = _seconds_per_epoch(runs)
    lines = [
        "| method | paper (left / right) | ours, honest selection | ours, authors' selection | seeds | s/epoch |",
        "|---|---|---|---|---|---|",
    ]
    methods = [m for m in PAPER if m in honest] + sorted(m for m in honest if m not in PAPER and m != "grid")
    for method in methods:
        h, a = honest[method], authors.get(method, {})
        paper = "{:.2f} / {:.2f}".format(*PAPER[method]) if method in PAPER else "-"
        lines.append(
            f"| `{method}` | {paper} | {_cell(h['mean'], h['std'], h['seeds'])} | "
            f"{_cell(a.get('mean'), a.get('std'), a.get('seeds', 0))} | {h['seeds']} | {seconds[method, None]:.1f} |"
        )
    authors_grid = {tuple(p["weights"].values()): p for p in authors.get("grid", [])}
    for point in honest.get("grid", []):
        weights = tuple(point["weights"].values())
        a = authors_grid.get(weights, {})
        lines.append(f"| `grid` {'/'.join(f'{w:.2f}' for w in weights)} | - | "
                     f"{_cell(point['mean'], point['std'], point['seeds'])} | "
                     f"{_cell(a.get('mean'), a.get('std'), a.get('seeds', 0))} | "
                     f"{point['seeds']} | {seconds['grid', weights]:.1f} |")
    return "\n".join(lines)


def figure(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import keras_mgda as km

    fig = km.plots.accuracy_profile(runs, references={f"paper {m}": v for m, v in PAPER.items()},
                                    title="MultiMNIST, honest selection")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    try:  # a 256-colour palette: a third of the size, the same figure
        from PIL import Image
    except ImportError:
        return
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON file of benchmarks/multi_mnist.py")
    parser.add_argument("--figure", default=None, help="write the accuracy profile PNG here")
    args = parser.parse_args()
    with open(args.results) as f:
        runs = json.load(f)["runs"]
    print(table(runs))
    if args.figure:
        figure(runs, args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
