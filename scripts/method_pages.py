"""The generated parts of the method pages: each method's constructor
defaults (read from the code), its MultiMNIST result (from the committed
campaign, `benchmarks/results/multi_mnist.json`) and its step-time
overhead (from `benchmarks/step_time.py`'s runs recorded in
docs/benchmarks.md), and the tables of docs/methods.md (the index) and
docs/guide/weightings.md (which method to use).

Pages keep their prose; only the blocks between `<!-- generated: NAME -->`
and `<!-- end generated -->` are rewritten. tests/test_method_pages.py
fails when a committed page differs from what this script writes.

Usage:
    python scripts/method_pages.py           # rewrite the blocks
    python scripts/method_pages.py --check   # list stale pages, exit 1 if any
"""

import argparse
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "multi_mnist.json"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


class Method(NamedTuple):
    key: str  # the registry name, `weighting="key"`, and docs/methods/<key>.md
    cls: str
    title: str
    paper: str  # short citation
    uses: str  # what the weighting consumes
    runs: tuple  # the campaign's method names
    conflict_free: str  # the update conflicts with no task
    scale_free: str  # rescaling one task's loss leaves the update's direction
    state: str
    cost: str  # the cost class


# Cost classes, cheapest first.
FREE, GRAM, SOLVE, FORWARD, PER_TASK = (
    "loss-only", "Gram", "Gram, heavier solve", "extra forward", "T encoder backwards")

METHODS = [
    Method("uniform", "Uniform", "Uniform", "the paper's baseline", "nothing", ("uniform",),
           "no", "no", "no", FREE),
    Method("static", "Static", "Static weights", "the grid-search baseline", "nothing", ("grid",),
           "no", "no", "no", FREE),
    Method("mgda", "MGDA", "MGDA-UB / MGDA", "Sener & Koltun, NeurIPS 2018", "Gram matrix",
           ("mgda_ub", "mgda"), "yes", "no", "no", GRAM),
    Method("uncertainty", "Uncertainty", "Uncertainty weighting", "Kendall et al., CVPR 2018", "losses",
           ("uncertainty",), "no", "learned", "learned", FREE),
    Method("gradnorm", "GradNorm", "GradNorm", "Chen et al., ICML 2018", "Gram diagonal, losses",
           ("gradnorm",), "no", "learned", "learned", GRAM),
    Method("dwa", "DWA", "Dynamic Weight Average", "Liu et al., CVPR 2019", "epoch losses", ("dwa",),
           "no", "no", "yes", FREE),
    Method("dtp", "DTP", "Dynamic Task Prioritization", "Guo et al., ECCV 2018", "KPIs or losses",
           ("dtp",), "no", "no", "yes", FREE),
    Method("lbtw", "LBTW", "Loss-Balanced Task Weighting", "Liu et al., AAAI 2019", "losses", ("lbtw",),
           "no", "no", "yes", FREE),
    Method("rlw", "RLW", "Random Loss Weighting", "Lin et al., TMLR 2022", "nothing", ("rlw",),
           "no", "no", "seed", FREE),
    Method("gls", "GLS", "Geometric Loss Strategy", "Chennupati et al., CVPRW 2019", "losses", ("gls",),
           "no", "yes", "no", FREE),
    Method("scaleinvariant", "ScaleInvariant", "Scale-invariant weighting", "Navon et al., ICML 2022",
           "losses", ("scaleinvariant",), "no", "yes", "no", FREE),
    Method("imtll", "IMTLL", "IMTL-L", "Liu et al., ICLR 2021", "losses", ("imtll",),
           "no", "learned", "learned", FREE),
    Method("stch", "STCH", "Smooth Tchebycheff", "Lin et al., ICML 2024", "losses", ("stch",),
           "no", "yes", "yes", FREE),
    Method("famo", "FAMO", "FAMO", "Liu et al., NeurIPS 2023", "losses before and after the step",
           ("famo",), "no", "yes", "yes", FORWARD),
    Method("pcgrad", "PCGrad", "PCGrad", "Yu et al., NeurIPS 2020", "Gram matrix", ("pcgrad",),
           "2 tasks", "no", "seed", SOLVE),
    Method("cagrad", "CAGrad", "CAGrad", "Liu et al., NeurIPS 2021", "Gram matrix", ("cagrad",),
           "c ≥ 1", "no", "no", SOLVE),
    Method("imtlg", "IMTLG", "IMTL-G", "Liu et al., ICLR 2021", "Gram matrix", ("imtlg",),
           "yes", "yes", "no", GRAM),
    Method("imtl", "IMTL", "IMTL (IMTL-L + IMTL-G)", "Liu et al., ICLR 2021", "Gram matrix, losses",
           ("imtl",), "yes", "yes", "learned", GRAM),
    Method("nashmtl", "NashMTL", "Nash-MTL", "Navon et al., ICML 2022", "Gram matrix", ("nashmtl",),
           "yes", "yes", "no", GRAM),
    Method("fairgrad", "FairGrad", "FairGrad", "Ban & Ji, ICML 2024", "Gram matrix", ("fairgrad",),
           "yes", "α = 1", "no", GRAM),
    Method("alignedmtl", "AlignedMTL", "Aligned-MTL", "Senushkin et al., CVPR 2023", "Gram matrix",
           ("alignedmtl",), "no", "no", "no", GRAM),
    Method("upgrad", "UPGrad", "UPGrad", "Quinton & Rey, 2024", "Gram matrix", ("upgrad",),
           "yes", "no", "no", SOLVE),
    Method("dualproj", "DualProj", "DualProj", "Quinton & Rey, 2024", "Gram matrix", ("dualproj",),
           "yes", "no", "no", GRAM),
    Method("config", "ConFIG", "ConFIG", "Liu et al., ICLR 2025", "Gram matrix", ("config",),
           "yes", "yes", "no", GRAM),
    Method("gradvac", "GradVac", "Gradient Vaccine", "Wang et al., ICLR 2021", "Gram matrix", ("gradvac",),
           "2 tasks", "no", "yes", SOLVE),
    Method("sdmgrad", "SDMGrad", "SDMGrad", "Xiao et al., NeurIPS 2023", "Gram matrix", ("sdmgrad",),
           "no", "no", "no", GRAM),
    Method("dbmtl", "DBMTL", "Dual-Balancing MTL", "Lin et al., 2023", "Gram diagonal, losses", ("dbmtl",),
           "no", "yes", "yes", GRAM),
    Method("crmogm", "CRMOGM", "CR-MOGM", "Zhou et al., NeurIPS 2022", "what it wraps", ("crmogm",),
           "no", "as wrapped", "yes", GRAM),
    Method("graddrop", "GradDrop", "GradDrop", "Chen et al., NeurIPS 2020", "per-task dL/dZ", ("graddrop",),
           "no", "no", "seed", GRAM),
    Method("moco", "MoCo", "MoCo", "Fernando et al., ICLR 2023", "per-task weight gradients", ("moco",),
           "approx.", "no", "yes", PER_TASK),
    Method("excessmtl", "ExcessMTL", "ExcessMTL", "He et al., ICML 2024", "per-task weight gradients",
           ("excessmtl",), "no", "no", "yes", PER_TASK),
]
BY_KEY = {method.key: method for method in METHODS}

# benchmarks/step_time.py runs (torch, 2-core CPU, MultiMNIST LeNet, batch
# 256, best of the repeats, each ratio against plain Keras fit measured
# side by side in the same run), as docs/benchmarks.md records them.
STEP_TIME_RUNS = {
    "loss": "KERAS_BACKEND=torch python benchmarks/step_time.py --method all --tasks 2 40 --steps 10 --repeats 5",
    "host": "KERAS_BACKEND=torch python benchmarks/step_time.py --method mgda cagrad pcgrad upgrad imtlg nashmtl "
            "alignedmtl uniform --tasks 2 40 --steps 10 --repeats 5",
    "new": "KERAS_BACKEND=torch python benchmarks/step_time.py --method mgda uniform rlw famo stch gls "
           "scaleinvariant imtll imtl --tasks 2 40 --steps 10 --repeats 3",
    "newgrad": "KERAS_BACKEND=torch python benchmarks/step_time.py --method mgda dbmtl fairgrad config dualproj "
               "gradvac sdmgrad excessmtl graddrop moco --tasks 2 40 --steps 10 --repeats 3",
    "exact": "KERAS_BACKEND=torch python benchmarks/step_time.py --method mgda mgda-parameters --tasks 2 40 "
             "--repeats 3",
}
# (step time over plain Keras's at T = 2, at T = 40, the run)
STEP_TIME = {
    "uniform": (1.015, 1.050, "host"), "static": (1.016, 1.038, "loss"), "mgda": (1.028, 1.069, "host"),
    "uncertainty": (1.045, 1.037, "loss"), "gradnorm": (1.084, 1.083, "loss"), "dwa": (1.031, 0.995, "loss"),
    "dtp": (1.055, 1.004, "loss"), "lbtw": (1.049, 1.034, "loss"), "rlw": (1.072, 1.042, "new"),
    "gls": (1.047, 1.018, "new"), "scaleinvariant": (1.043, 1.029, "new"), "imtll": (1.038, 1.046, "new"),
    "stch": (1.075, 1.027, "new"), "famo": (1.566, 1.682, "new"), "pcgrad": (1.053, 1.162, "host"),
    "cagrad": (1.076, 1.226, "host"), "imtlg": (1.055, 1.095, "host"), "imtl": (1.129, 1.067, "new"),
    "nashmtl": (1.023, 1.056, "host"), "fairgrad": (1.003, 1.097, "newgrad"),
    "alignedmtl": (1.052, 1.057, "host"), "upgrad": (1.034, 1.105, "host"), "dualproj": (1.064, 1.073, "newgrad"),
    "config": (1.036, 1.077, "newgrad"), "gradvac": (1.073, 1.231, "newgrad"), "sdmgrad": (1.045, 1.113, "newgrad"),
    "dbmtl": (1.094, 1.064, "newgrad"), "graddrop": (1.080, 1.078, "newgrad"), "moco": (1.572, 11.37, "newgrad"),
    "excessmtl": (1.573, 12.00, "newgrad"),
}
EXACT_MGDA = (2.002, 12.14, "exact")  # MGDA(mode="parameters")


def _weighting_class(name):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, str(ROOT))
    import keras_mgda

    return getattr(keras_mgda.weighting, name)


def defaults_block(method):
    """The constructor's options, their types and defaults, from the code."""
    # From `__init__`, not the class: Python 3.10 reads the class's signature
    # from keras.layers.Layer.__new__ when `__init__` is inherited.
    signature = inspect.signature(_weighting_class(method.cls).__init__)
    lines = [
        f"`keras_mgda.weighting.{method.cls}(...)`, or `weighting=\"{method.key}\"`.",
        "",
        "| option | type | default |",
        "|---|---|---|",
    ]
    for parameter in signature.parameters.values():
        if parameter.name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        kind = inspect.formatannotation(parameter.annotation).replace("|", "\\|")
        default = "required" if parameter.default is parameter.empty else f"`{parameter.default!r}`"
        lines.append(f"| `{parameter.name}` | `{kind}` | {default} |")
    return "\n".join(lines)


# The example of every page: two tasks whose gradients conflict.
EXAMPLE = """import keras
import numpy as np

import keras_mgda as km

# Two tasks whose gradients conflict: |g_1| = 1, |g_2| = 2, cosine -0.75.
gram = np.array([[1.0, -1.5], [-1.5, 4.0]], "float32")
losses = np.array([0.7, 2.3], "float32")
weighting = km.weighting.{constructor}
weighting.build(2, ["left", "right"])
weights = keras.ops.convert_to_numpy(weighting(losses{gram}))
print(weights.round(3))  # {weights}
"""
IMPROVEMENT = "print((gram @ weights).round(3))  # {improvement}: g_t . d, each task's first-order decrease\n"
AGGREGATOR = """<!-- not run: a fragment: `inputs` and `outputs` are your model's -->
```python
model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=keras_mgda.weighting.{constructor})
```"""


def _constructor(method):
    special = {"static": "Static([0.3, 0.7])", "rlw": "RLW(seed=0)", "mgda": 'MGDA(normalization="none")'}
    return special.get(method.key, f"{method.cls}()")


def example_block(method):
    """A runnable call on a conflicting pair of gradients, with what it
    prints (computed here, on torch), or a marked fragment for the methods
    that aggregate the gradients themselves."""
    import keras

    weighting = eval(f"cls.{_constructor(method)}", {"cls": _namespace()})
    if getattr(weighting, "aggregates_gradients", False):
        return AGGREGATOR.format(constructor=_constructor(method))
    gram = np.array([[1.0, -1.5], [-1.5, 4.0]], "float32")
    losses = np.array([0.7, 2.3], "float32")
    weighting.build(2, ["left", "right"])
    weights = keras.ops.convert_to_numpy(weighting(losses, gram if weighting.requires_gram else None))
    code = EXAMPLE.format(constructor=_constructor(method), gram=", gram" if weighting.requires_gram else "",
                          weights=_printed(weights))
    if weighting.requires_gram:
        code += IMPROVEMENT.format(improvement=_printed(gram @ weights))
    return "```python\n" + code + "```"


def _printed(values):
    return str(np.asarray(values, "float32").round(3) + 0.0)  # + 0.0: no "-0."


def _namespace():
    _weighting_class("Weighting")
    import keras_mgda

    return keras_mgda.weighting


def _summary():
    _weighting_class("Weighting")  # the backend set, the checkout importable
    import keras_mgda as km

    with open(RESULTS) as handle:
        runs = json.load(handle)["runs"]
    return km.plots.summarize(runs, selection="honest"), km.plots.summarize(runs, selection="authors")


def _percent(entry):
    mean, std = 100 * np.asarray(entry["mean"]), 100 * np.asarray(entry["std"])
    if entry["seeds"] > 1:
        return f"{mean[0]:.2f} ± {std[0]:.2f} / {mean[1]:.2f} ± {std[1]:.2f}"
    return f"{mean[0]:.2f} / {mean[1]:.2f}"


def curve_offset(entry, grid):
    """Right-digit accuracy above (+) or below (-) the static-weights curve
    at the entry's left accuracy, in points; None off the curve's range."""
    points = sorted((100 * g["mean"][0], 100 * g["mean"][1]) for g in grid)
    xs, ys = zip(*points)
    left, right = 100 * entry["mean"][0], 100 * entry["mean"][1]
    if not xs[0] <= left <= xs[-1]:
        return None
    return right - float(np.interp(left, xs, ys))


def _signed(points):
    """+0.27, -0.14, and 0.00 for what rounds to zero (never -0.00)."""
    text = f"{points:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _run_label(run):
    return {"mgda_ub": "MGDA-UB (`MGDA(normalization=\"none\")`)",
            "mgda": "exact MGDA (`MGDA(normalization=\"none\", mode=\"parameters\")`)"}.get(run, f"`{run}`")


def _run_row(run, honest, authors):
    entry = honest[run]
    if min(entry["mean"]) < 0.5:
        where = "died in epoch 1: chance accuracy"
    else:
        offset = curve_offset(entry, honest["grid"])
        where = "-" if offset is None else _signed(offset)
    return (f"| {_run_label(run)} | {_percent(entry)} | {_percent(authors[run])} | "
            f"{entry['seeds']} | {where} |")


def _grid_row(point, authors):
    weights = point["weights"]
    same = [a for a in authors.get("grid", []) if a["weights"] == weights]
    label = f"`Static([{weights['left']:.2f}, {weights['right']:.2f}])`"
    return (f"| {label} | {_percent(point)} | {_percent(same[0]) if same else '-'} | "
            f"{point['seeds']} | the curve |")


def multi_mnist_block(method, summaries):
    """The method's rows of the MultiMNIST campaign, with uniform weighting,
    MGDA-UB and single-task training beside them."""
    honest, authors = summaries
    header = [
        "| run | left / right, honest | left / right, authors' selection | seeds | vs static curve |",
        "|---|---|---|---|---|",
    ]
    if method.key == "static":
        rows = [_grid_row(point, authors) for point in honest["grid"]]
    else:
        rows = [_run_row(run, honest, authors) for run in method.runs]
    context = [run for run in ("uniform", "mgda_ub", "single_task") if run not in method.runs]
    rows += [_run_row(run, honest, authors).replace(" | ", " (for comparison) | ", 1) for run in context]
    return "\n".join(header + rows)


def cost_block(method):
    """The step time over plain Keras's at 2 and 40 tasks, and the command."""
    t2, t40, run = STEP_TIME.get(method.key, (None, None, None))
    if run is None:
        return ("Not measured on its own: the wrapped weighting's cost plus a moving average of T "
                "numbers (`benchmarks/step_time.py --method crmogm` measures it).")
    lines = [
        "| tasks | step time / plain Keras `fit` |",
        "|---|---:|",
        f"| 2 | {t2:.2f} |",
        f"| 40 | {t40:.2f} |",
    ]
    if method.key == "mgda":
        lines += [f"| 2, `mode=\"parameters\"` | {EXACT_MGDA[0]:.2f} |",
                  f"| 40, `mode=\"parameters\"` | {EXACT_MGDA[1]:.2f} |"]
    lines += ["", "```bash", STEP_TIME_RUNS[run], "```"]
    if method.key == "mgda":
        lines += ["", "```bash", STEP_TIME_RUNS["exact"], "```"]
    return "\n".join(lines)


def _cell(value):
    return "-" if value is None else f"{value:.2f}"


def index_block(summaries):
    """docs/methods.md: every method, its paper, what it uses, its cost and
    its MultiMNIST result."""
    honest, _ = summaries
    lines = [
        "| method | paper | uses | T=2 | T=40 | MultiMNIST left / right |",
        "|---|---|---|---:|---:|---|",
    ]
    for method in METHODS:
        t2, t40, _ = STEP_TIME.get(method.key, (None, None, None))
        run = method.runs[0]
        result = _percent(honest[run]) if run in honest and run != "grid" else "the static curve"
        if run in honest and run != "grid" and min(honest[run]["mean"]) < 0.5:
            result = "diverged (SGD 0.05)"
        lines.append(f"| [{method.title}](methods/{method.key}.md) | {method.paper} | {method.uses} | "
                     f"{_cell(t2)} | {_cell(t40)} | {result} |")
    return "\n".join(lines)


def decision_block(summaries):
    """docs/guide/weightings.md: the properties that decide between methods."""
    honest, _ = summaries
    lines = [
        "| method | avoids conflicts | loss-scale invariant | keeps state | Gram matrix | "
        "per-parameter gradients | cost class (T=40) | MultiMNIST vs static curve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        uses_gram = "yes" if "Gram" in method.uses else ("as wrapped" if method.key == "crmogm" else "no")
        per_parameter = "yes" if method.cost == PER_TASK else ("optional" if uses_gram == "yes" else "no")
        t40 = STEP_TIME.get(method.key, (None, None))[1]
        cost = method.cost + ("" if t40 is None else f" ({t40:.2f}x)")
        lines.append(f"| [{method.title}](../methods/{method.key}.md) | {method.conflict_free} | "
                     f"{method.scale_free} | {method.state} | {uses_gram} | {per_parameter} | {cost} | "
                     f"{_offset_cell(method, honest)} |")
    return "\n".join(lines)


def _offset_cell(method, honest):
    run = method.runs[0]
    if run == "grid":
        return "the curve"
    entry = honest.get(run)
    if entry is None:
        return "-"
    if min(entry["mean"]) < 0.5:
        return "diverged"
    offset = curve_offset(entry, honest["grid"])
    return "-" if offset is None else _signed(offset)


def blocks_for(page, summaries):
    """`{block name: text}` for one page."""
    name = page.relative_to(ROOT / "docs").as_posix()
    if name == "methods.md":
        return {"index": index_block(summaries)}
    if name == "guide/weightings.md":
        return {"decision": decision_block(summaries)}
    method = BY_KEY[page.stem]
    return {"example": example_block(method), "defaults": defaults_block(method),
            "multi_mnist": multi_mnist_block(method, summaries), "cost": cost_block(method)}


def render(page, summaries):
    """The page's text with every generated block rewritten."""
    blocks = blocks_for(page, summaries)

    def replace(match):
        name = match.group("name")
        if name not in blocks:
            raise KeyError(f"{page}: no generator for block {name!r}")
        return match.group(1) + blocks[name] + "\n" + match.group(4)

    return BLOCK.sub(replace, page.read_text())


def pages():
    docs = ROOT / "docs"
    return [docs / "methods.md", docs / "guide" / "weightings.md"] + [
        docs / "methods" / f"{method.key}.md" for method in METHODS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report stale pages instead of writing them")
    args = parser.parse_args(argv)
    summaries = _summary()
    stale = []
    for page in pages():
        text = render(page, summaries)
        if text != page.read_text():
            stale.append(page)
            if not args.check:
                page.write_text(text)
    for page in stale:
        print(("stale: " if args.check else "wrote: ") + str(page.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
