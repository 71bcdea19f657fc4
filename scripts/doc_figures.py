"""The figures of the plots guide (docs/guide/plots.md), drawn by
`keras_mgda.plots` into docs/figures/: the task weights from the committed
MultiMNIST campaign (benchmarks/results/multi_mnist.json), the conflict
heatmap and the radar chart from small synthetic inputs (seeded, named as
such in their titles). The accuracy profile is the MultiMNIST page's,
written by benchmarks/multi_mnist_report.py. PNGs are saved with a
256-colour palette (Pillow) to keep them small.

Usage:
    python scripts/doc_figures.py
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "multi_mnist.json"
OUT = ROOT / "docs" / "figures"
DPI = 80  # small files; the figures are sized in inches for the page


def _runs():
    with open(RESULTS) as handle:
        return json.load(handle)["runs"]


def task_weights(km, runs):
    """MGDA-UB's weights per epoch, seed 0 of the campaign."""
    run = next(r for r in runs if r["method"] == "mgda_ub" and r["seed"] == 0)
    logs = {f"{task}_alpha": [epoch[f"{task}_alpha"] for epoch in run["history"]] for task in ("left", "right")}
    return km.plots.task_weights(logs, title="MGDA-UB on MultiMNIST, seed 0")


def conflict(km):
    """Five tasks whose gradients are random (seed 0), two of them made to
    conflict with the first."""
    rng = np.random.default_rng(0)
    gradients = rng.normal(size=(5, 8))
    gradients[3] = -0.8 * gradients[0] + 0.3 * gradients[3]
    gradients[4] = -0.4 * gradients[0] + gradients[4]
    names = ["depth", "segmentation", "normals", "edges", "saliency"]
    return km.plots.conflict_heatmap(gradients @ gradients.T, names,
                                     title="Cosine between task gradients (synthetic)")


def radar(km):
    """Per-attribute error of two methods on six attributes (synthetic)."""
    rng = np.random.default_rng(0)
    attributes = ["Smiling", "Male", "Young", "Eyeglasses", "Wavy_Hair", "Bangs"]
    base = rng.uniform(0.02, 0.15, size=len(attributes))
    scores = {
        "method A": dict(zip(attributes, base)),
        "method B": dict(zip(attributes, base * rng.uniform(0.85, 1.15, size=len(attributes)))),
    }
    return km.plots.radar(scores, percent=True, title="Error per attribute (synthetic)")


def _save(figure, path):
    """PNG with a tight box, then a 256-colour palette (about a third of the
    size; the figures have few colours)."""
    from PIL import Image

    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)


def main():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, str(ROOT))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import keras_mgda as km

    OUT.mkdir(exist_ok=True)
    runs = _runs()
    figures = {
        "task_weights.png": task_weights(km, runs),
        "conflict_heatmap.png": conflict(km),
        "radar.png": radar(km),
    }
    for name, figure in figures.items():
        _save(figure, OUT / name)
        plt.close(figure)
        print(f"wrote {(OUT / name).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
