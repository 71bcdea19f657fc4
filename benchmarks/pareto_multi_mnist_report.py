"""The comparison of `benchmarks/pareto_multi_mnist.py`'s results: for each
start and for all starts joined, the explored front against (a) the
committed 100-epoch static-weights grid (`benchmarks/results/multi_mnist.json`,
seed 0, trained from scratch) and (b) the weighted-sum fine-tunes from the
same start, as numbers: hypervolume in test loss and test error, points on
the joint front, spread per task, cost in gradient-pass equivalents and
seconds, each as a ratio to (a) and to (b). Draws the figure in error and
loss space.

Reference points (fixed, so that every set is measured against the same
one): error space, 1.1 times the grid's worst test error per task (points
worse than that add nothing); loss space, 1.1 times the worst test loss per
task of every start and fine-tune (the committed grid records accuracies
only, so it has no loss hypervolume). The grid's errors are its final
(100th) epoch's, as the starts are final models.

Costs: a gradient-pass equivalent is one example's forward and backward
pass (a training step's cost per example); the exploration's forward-mode
passes, Hessian-vector products and evaluations count at the ratios timed
in the same run (`unit_costs`). Seconds are wall time on the machine that
ran them; the grid's are its campaign records'.

Usage:
    python benchmarks/pareto_multi_mnist_report.py benchmarks/results/pareto_multi_mnist.json \\
        --figure docs/figures/pareto_multi_mnist.png
"""

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "results" / "multi_mnist.json"


def committed_grid(path=GRID):
    """The committed grid (seed 0): final-epoch test errors and its cost."""
    with open(path) as handle:
        runs = [r for r in json.load(handle)["runs"] if r["method"] == "grid" and r["seed"] == 0]
    runs.sort(key=lambda r: r["weights"]["left"])
    final = [r["history"][-1] for r in runs]
    errors = np.array([[1 - e["test_left_acc"], 1 - e["test_right_acc"]] for e in final])
    examples = 50_000  # training pairs per epoch (10,000 digits held out)
    return {"errors": errors, "losses": None, "weights": [r["weights"] for r in runs],
            "cost": {"gradients": sum(r["epochs"] for r in runs) * examples,
                     "seconds": sum(r["train_seconds"] for r in runs)}}


def exploration_cost(cost, unit):
    """An exploration's cost in gradient-pass equivalents."""
    ratio = unit["gradient_equivalents"]
    return (cost["gradient_examples"] + ratio["jvp"] * cost["jvp_examples"] + ratio["hvp"] * cost["hvp_examples"]
            + ratio["forward"] * cost["evaluation_examples"])


def _arrays(points):
    losses = np.array([p["losses"] for p in points])
    return losses, 1.0 - np.array([p["accuracies"] for p in points])


def start_sets(record, unit):
    """The sets of one start: its exploration (the start excluded), its
    fine-tunes per epoch count, and the start alone."""
    explored = [p for p in record["explored"]["points"] if p["direction"] >= 0]
    losses, errors = _arrays(explored)
    sets = {"explored": {"losses": losses, "errors": errors, "cost": {
        "gradients": exploration_cost(record["explored"]["cost"], unit),
        "seconds": record["explored"]["cost"]["seconds"]}}}
    for tune in record["fine_tunes"]:
        losses, errors = _arrays(tune["points"])
        sets[f"fine-tune x{tune['epochs']}"] = {"losses": losses, "errors": errors, "cost": {
            "gradients": tune["cost"]["example_gradients"], "seconds": tune["cost"]["seconds"]}}
    losses, errors = _arrays([record["start_scores"]])
    sets["start"] = {"losses": losses, "errors": errors, "cost": {"gradients": 0.0, "seconds": 0.0}}
    return sets


def references(results, grid):
    """The fixed reference points (see the module docstring)."""
    losses = [record["start_scores"]["losses"] for record in results["starts"]]
    losses += [p["losses"] for record in results["starts"] for tune in record["fine_tunes"] for p in tune["points"]]
    return {"error": 1.1 * grid["errors"].max(axis=0), "loss": 1.1 * np.max(losses, axis=0)}


def measure(sets, reference):
    """Per set: hypervolumes, points on the joint front of all the sets,
    spread (max - min) of each task's error and loss."""
    import keras_mgda as km

    out = {}
    for space in ("error", "loss"):
        key = "losses" if space == "loss" else "errors"
        names = [n for n in sets if sets[n][key] is not None]
        union = np.concatenate([sets[n][key] for n in names])
        on_front = km.pareto.pareto_mask(union)
        offset = 0
        for name in names:
            values = sets[name][key]
            entry = out.setdefault(name, {"points": len(values)})
            entry[f"hv_{space}"] = km.pareto.hypervolume(values, reference[space])
            entry[f"front_{space}"] = int(on_front[offset:offset + len(values)].sum())
            entry[f"spread_{space}"] = (values.max(axis=0) - values.min(axis=0)).tolist()
            offset += len(values)
    for name in out:
        out[name]["cost"] = sets[name]["cost"]
    return out


def _ratio(a, b):
    return float("nan") if not b else a / b


def rows(measured, against):
    """Markdown rows: each set's numbers, and explored / (b) and / (a)."""
    lines = []
    for name, m in measured.items():
        hv_loss = f"{m['hv_loss']:.4f}" if "hv_loss" in m else "-"
        spread = "/".join(f"{100 * s:.2f}" for s in m["spread_error"])
        loss_spread = "/".join(f"{s:.3f}" for s in m["spread_loss"]) if "spread_loss" in m else "-"
        lines.append(f"| {name} | {m['points']} | {hv_loss} | {1e4 * m['hv_error']:.2f} | "
                     f"{m.get('front_loss', '-')} / {m['front_error']} | {spread} | {loss_spread} | "
                     f"{m['cost']['gradients'] / 1e6:.3f} | {m['cost']['seconds']:.0f} |")
    explored = measured["explored"]
    for label, name in against:
        other = measured[name]
        hv_loss = (f"{_ratio(explored['hv_loss'], other['hv_loss']):.3f}"
                   if "hv_loss" in other and "hv_loss" in explored else "-")
        lines.append(
            f"| explored / {label} | | {hv_loss} | {_ratio(explored['hv_error'], other['hv_error']):.3f} | | "
            f"{_spread_ratio(explored, other, 'error')} | {_spread_ratio(explored, other, 'loss')} | "
            f"{_ratio(explored['cost']['gradients'], other['cost']['gradients']):.4f} | "
            f"{_ratio(explored['cost']['seconds'], other['cost']['seconds']):.4f} |")
    return lines


def _spread_ratio(explored, other, space):
    key = f"spread_{space}"
    if key not in explored or key not in other:
        return "-"
    return "/".join(f"{_ratio(a, b):.2f}" for a, b in zip(explored[key], other[key]))


HEADER = ["| set | points | HV, test loss | HV, test error (x1e-4) | on the joint front (loss / error) | "
          "error spread, left/right (points) | loss spread, left/right | cost, M gradient passes | seconds |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]


def comparison(results, grid):
    """All the tables as Markdown lines, and the measured numbers."""
    unit, reference = results["unit_costs"], references(results, grid)
    lines, numbers, joined = [], {}, []
    for record in results["starts"]:
        sets = start_sets(record, unit)
        sets["(a) grid"] = grid
        joined.append(sets)
        tunes = [n for n in sets if n.startswith("fine-tune")]
        numbers[record["name"]] = measure(sets, reference)
        lines += [f"\n{record['name']} (stationarity at the start "
                  f"{record['explored']['points'][0]['stationarity']:.3f}):\n"] + HEADER
        lines += rows(numbers[record["name"]], [(f"(b) {n}", n) for n in tunes] + [("(a)", "(a) grid")])
    sets = {"explored": _join([s["explored"] for s in joined])}
    for name in [n for n in joined[0] if n.startswith("fine-tune")]:
        sets[name] = _join([s[name] for s in joined])
    sets["(a) grid"] = grid
    numbers["joined"] = measure(sets, reference)
    lines += [f"\nAll {len(joined)} starts joined:\n"] + HEADER
    lines += rows(numbers["joined"], [(f"(b) {n}", n) for n in sets if n.startswith("fine")] + [("(a)", "(a) grid")])
    return lines, numbers, reference


VARIANT_HEADER = ["| start | exploration setting | points | HV loss / (b) x1 | HV error / (b) x1 | HV error / (a) | "
                  "on the joint front (error) | cost / (b) x1 (gradient passes) | seconds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]


def variants(results, grid):
    """Markdown rows: each exploration setting tried from a start (the
    main setting of every start first), against that start's fine-tunes
    and the grid."""
    unit, reference = results["unit_costs"], references(results, grid)
    main = {record["name"]: record for record in results["starts"]}
    lines = list(VARIANT_HEADER)
    for record in [r for r in results["starts"] if results.get("variants")] + results.get("variants", []):
        base = main[record["name"].split(":")[0]]
        sets = start_sets(dict(base, explored=record["explored"]), unit)
        sets["(a) grid"] = grid
        m = measure(sets, reference)
        e, b, a = m["explored"], m["fine-tune x1"], m["(a) grid"]
        setting = json.dumps(record.get("explore_settings", results["settings"]["explore"]))
        lines.append(f"| {base['name']} | `{setting}` | "
                     f"{e['points']} | {e['hv_loss'] / b['hv_loss']:.2f} | {e['hv_error'] / b['hv_error']:.3f} | "
                     f"{e['hv_error'] / a['hv_error']:.3f} | {e['front_error']} | "
                     f"{e['cost']['gradients'] / b['cost']['gradients']:.2f} | {e['cost']['seconds']:.0f} |")
    return lines


def _join(sets):
    joined = {key: np.concatenate([s[key] for s in sets]) for key in ("losses", "errors")}
    joined["cost"] = {k: sum(s["cost"][k] for s in sets) for k in ("gradients", "seconds")}
    return joined


def figure(results, grid, path):
    """Error and loss space: the grid (stars), each start (a large dot), its
    explored walks (lines) and its fine-tunes (squares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    axes[0].plot(*(100 * grid["errors"].T), "k*", markersize=13, label="(a) grid, 100 epochs from scratch")
    colors = plt.get_cmap("tab10")
    for i, record in enumerate(results["starts"]):
        _draw_start(axes, record, colors(i))
    for ax, space in zip(axes, ("test error (%)", "test loss")):
        ax.set_xlabel(f"left {space}")
        ax.set_ylabel(f"right {space}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _draw_start(axes, record, color):
    points = record["explored"]["points"]
    losses, errors = _arrays(points)
    directions = np.array([p["direction"] for p in points])
    for values, ax, scale in ((errors, axes[0], 100), (losses, axes[1], 1)):
        for k in sorted(set(directions) - {-1}):
            path = np.concatenate([[0], np.flatnonzero(directions == k)])
            ax.plot(*(scale * values[path].T), "-", color=color, marker=".", markersize=4, alpha=0.8,
                    label=f"{record['name']}: explored" if k == 0 else None)
        ax.plot(*(scale * values[0]), "o", color=color, markersize=10, markeredgecolor="black")
        tunes = record["fine_tunes"][-1]  # the longest fine-tunes
        tuned = _arrays(tunes["points"])[1 if ax is axes[0] else 0]
        ax.plot(*(scale * tuned.T), "s", color=color, markersize=6, markerfacecolor="none",
                label=f"{record['name']}: (b) x{tunes['epochs']}" if ax is axes[0] else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--grid", default=str(GRID))
    p.add_argument("--figure", default=None)
    args = p.parse_args(argv)
    with open(args.results) as handle:
        results = json.load(handle)
    grid = committed_grid(args.grid)
    lines, _, reference = comparison(results, grid)
    print(f"reference points: error {np.round(100 * reference['error'], 2).tolist()} %, "
          f"loss {np.round(reference['loss'], 4).tolist()}")
    print("\n".join(lines))
    if results.get("variants"):
        print("\nExploration settings:\n")
        print("\n".join(variants(results, grid)))
    if args.figure:
        figure(results, grid, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
