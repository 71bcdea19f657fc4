"""The accuracy profile of Sener & Koltun's Figures 3 and 4: one task's
accuracy against another's, one marker per method, the static-weight grid
as a curve."""

import math
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from keras_mgda.plots._matplotlib import pyplot
from keras_mgda.plots._panels import method_panels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "accuracy_profile",
    "summarize",
]

GRID = "grid"
SINGLE_TASK = "single_task"

# How the paper's methods are named in the legend; any other method is
# shown by its registry name.
METHOD_LABELS = {
    "mgda_ub": "MGDA-UB",
    "mgda": "MGDA (exact)",
    "uniform": "uniform",
    "uncertainty": "uncertainty",
    "gradnorm": "GradNorm",
    SINGLE_TASK: "single task",
    GRID: "grid (static weights)",
}
# Eleven markers against ten colours: coprime, so the first 110 methods
# each get their own pair ("8" is left out: it reads as "o").
_MARKERS = "osD^v<>phPX"
_COLOURS = [f"C{index}" for index in range(10)]
# Legend entries that still fit inside the axes.
_LEGEND_INSIDE_MAX = 12


def _runs(results):
    """The list of run records from a results dict or a list."""
    if isinstance(results, dict):
        results = results.get("runs", [])
    return list(results)


def _accuracies(run, tasks, selection):
    """(accuracy of each task) of one run, or None when it lacks one."""
    prefix = "authors_" if selection == "authors" else ""
    values = [run.get(f"{prefix}{task}_acc") for task in tasks]
    if any(value is None for value in values):
        return None
    return [float(value) for value in values]


def _mean_std(rows):
    """Per-column mean and (population) standard deviation of equal-length
    lists; the std of one seed is 0."""
    count = len(rows)
    means = [sum(column) / count for column in zip(*rows)]
    stds = [
        math.sqrt(sum((value - mean) ** 2 for value in column) / count)
        for column, mean in zip(zip(*rows), means)
    ]
    return means, stds


def summarize(
    results: dict[str, Any] | Iterable[Mapping[str, Any]],
    tasks: Sequence[str] = ("left", "right"),
    selection: str = "honest",
) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each method's accuracies.

    Args:
        results: the `runs` list of a benchmark's JSON file, or the loaded
            dict `{"runs": [...]}`. Each run has `"method"`, `"seed"` and
            `"<task>_acc"` (and `"authors_<task>_acc"`); grid runs also have
            `"weights"` `{task: weight}`.
        tasks: the two (or more) task names.
        selection: `"honest"` (`<task>_acc`) or `"authors"`
            (`authors_<task>_acc`).

    Returns:
        A dict `{method: {"mean": [...], "std": [...], "seeds": n}}` for the
        methods other than `"grid"`, and under `"grid"` a list of such
        dicts, one per weight vector, each with its `"weights"`, sorted by
        the first task's weight.

    Example:

    ```python
    with open("benchmarks/results/multi_mnist.json") as f:
        summary = keras_mgda.plots.summarize(json.load(f))
    summary["mgda_ub"]["mean"]  # [left accuracy, right accuracy]
    ```
    """
    if selection not in ("honest", "authors"):
        raise ValueError(f"selection must be 'honest' or 'authors'; received {selection!r}.")
    groups = {}
    for run in _runs(results):
        values = _accuracies(run, tasks, selection)
        if values is None:
            continue
        method = run.get("method")
        key = (method, None)
        if method == GRID:
            weights = run.get("weights") or {}
            key = (method, tuple(float(weights.get(task, math.nan)) for task in tasks))
        groups.setdefault(key, []).append(values)
    summary = {}
    for (method, weights), rows in groups.items():
        means, stds = _mean_std(rows)
        entry = {"mean": means, "std": stds, "seeds": len(rows)}
        if method == GRID:
            entry["weights"] = dict(zip(tasks, weights))
            summary.setdefault(GRID, []).append(entry)
        else:
            summary[method] = entry
    if GRID in summary:
        summary[GRID].sort(key=lambda entry: entry["weights"][tasks[0]])
    return summary


def accuracy_profile(
    results: dict[str, Any] | Iterable[Mapping[str, Any]],
    tasks: Sequence[str] = ("left", "right"),
    ax: "Axes | None" = None,
    *,
    selection: str = "honest",
    percent: bool = True,
    references: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
    failed_below: float | None = 0.5,
    groups: str | Mapping[str, Sequence[str]] | None = "family",
) -> "Figure":
    """The accuracy profile of Sener & Koltun's Figure 3: one task's
    accuracy against the other's, one marker per method.

    Each method is drawn at its mean accuracy over seeds, with error bars of
    one standard deviation (population std; none with a single seed). The
    static-weight grid runs are averaged per weight vector and joined as a
    curve, ordered by the first task's weight; the single-task baseline is a
    star.

    Args:
        results: the `runs` list of a benchmark's JSON file (e.g.
            `benchmarks/results/multi_mnist.json`) or the loaded dict
            `{"runs": [...]}`. Runs need `"method"` and `"<task>_acc"`
            (fractions); grid runs also `"weights"`.
        tasks: the two task names: the first on the x axis, the second on
            the y axis.
        ax: a matplotlib Axes to draw on; a new figure when None.
        selection: `"honest"` (the accuracies at the best validation epoch,
            `<task>_acc`) or `"authors"` (the best test epoch,
            `authors_<task>_acc`).
        percent: show accuracies in percent (True) or as fractions.
        references: optional `{label: (x, y)}` of published points (in the
            axes' units) drawn as hollow grey markers with their label
            beside them, e.g. the paper's.
        title: optional axes title.
        failed_below: a method whose mean accuracy on either task is below
            this fraction (a run that diverged) is not drawn but listed in
            the legend with its accuracies, "off the axes", so that it does
            not squeeze every other method into a corner; None draws every
            method.
        groups: how to split many methods into panels that share their
            axes, each with the static-weight curve and the single-task
            star: `"family"` (the paper's comparison, then the loss-based,
            Gram-matrix and gradient-aggregating methods of
            `keras_mgda.weighting`), a mapping `{panel title: [methods]}`
            (methods it does not name go to a panel "other"), or None for
            one panel. `"family"` splits only more than ten methods; with
            `ax`, or when every method falls in one group, one panel.

    Returns:
        The matplotlib `Figure` that holds the axes.

    Example:

    ```python
    import json
    import keras_mgda

    with open("benchmarks/results/multi_mnist.json") as f:
        results = json.load(f)
    figure = keras_mgda.plots.accuracy_profile(
        results, references={"MGDA-UB (paper)": (97.26, 95.90)})
    figure.savefig("multi_mnist_profile.png", dpi=150)
    ```
    """
    plt = pyplot()
    summary = _checked_summary(results, tasks, selection)
    panels = method_panels([m for m in summary if m not in (GRID, SINGLE_TASK)], groups) if ax is None else {}
    if len(panels) > 1:
        return _small_multiples(plt, summary, panels, tasks, selection, percent, references, title, failed_below)
    return _one_panel(plt, ax, summary, tasks, selection, percent, references, title, failed_below)


def _checked_summary(results, tasks, selection):
    """`summarize`'s per-method summary, with a clear error where there is
    nothing to plot."""
    if len(tasks) != 2:
        raise ValueError(f"accuracy_profile plots two tasks; received tasks={tasks!r}.")
    summary = summarize(results, tasks, selection)
    if not summary:
        raise ValueError(
            f"No run has {tasks[0]!r} and {tasks[1]!r} accuracies for selection "
            f"{selection!r}; pass the benchmark's runs."
        )
    return summary


def _one_panel(plt, ax, summary, tasks, selection, percent, references, title, failed_below):
    """Every method in one axes (`ax`, or a new figure's)."""
    many = len(summary) + len(references or {}) > _LEGEND_INSIDE_MAX
    if ax is None:
        # Room on the right for a legend of many methods.
        figure, ax = plt.subplots(figsize=(10, 5.5) if many else (6, 5), layout="constrained")
    else:
        figure = ax.figure
    _draw_summary(ax, summary, 100.0 if percent else 1.0, failed_below)
    _draw_references(ax, references or {})
    _label_axes(ax, tasks, selection, percent, title)
    _place_legend(ax, many)
    return figure


def _small_multiples(plt, summary, panels, tasks, selection, percent, references, title, failed_below):
    """One panel per group of methods, sharing their axes; the curve and the
    single-task star in each, the published points in the first."""
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(12, 4.6 * rows), sharex=True, sharey=True,
                                layout="constrained", squeeze=False)
    shared = {key: summary[key] for key in (GRID, SINGLE_TASK) if key in summary}
    for index, (ax, (name, methods)) in enumerate(zip(axes.flat, panels.items())):
        _draw_summary(ax, {**shared, **{m: summary[m] for m in methods}}, 100.0 if percent else 1.0, failed_below)
        if index == 0:
            _draw_references(ax, references or {})
        _label_axes(ax, tasks, selection, percent, name)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    which = "best validation epoch" if selection == "honest" else "best test epoch (authors' selection)"
    figure.suptitle(title if title is not None else f"Accuracy profile, {which}")
    return figure


def _label_axes(ax, tasks, selection, percent, title):
    """Axis labels in the accuracies' unit, the title (the selection by
    default) and a light grid."""
    unit = " (%)" if percent else ""
    which = "best validation epoch" if selection == "honest" else "best test epoch (authors' selection)"
    ax.set_xlabel(f"{tasks[0]} accuracy{unit}")
    ax.set_ylabel(f"{tasks[1]} accuracy{unit}")
    ax.set_title(title if title is not None else f"Accuracy profile, {which}")
    ax.grid(True, alpha=0.3)


def _place_legend(ax, many):
    """Inside the axes for a few methods; beside them, in two columns, for
    many (a full campaign's thirty markers cluster within a point or two,
    where a legend inside would cover them)."""
    if not many:
        ax.legend(fontsize="small", loc="best")
        return
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, ncol=2)


def _draw_summary(ax, summary, scale, failed_below):
    """The grid curve, one marker per method (or a legend line for a
    method that failed), the single-task star."""

    def errorbar(entries, **style):
        x = [scale * entry["mean"][0] for entry in entries]
        y = [scale * entry["mean"][1] for entry in entries]
        xerr = [scale * entry["std"][0] for entry in entries]
        yerr = [scale * entry["std"][1] for entry in entries]
        return ax.errorbar(x, y, xerr=xerr, yerr=yerr, capsize=3, **style)

    if GRID in summary:
        # The curve first, so the methods' markers are drawn over it.
        errorbar(summary[GRID], fmt="-", marker=".", color="0.5", label=METHOD_LABELS[GRID])
    methods = [m for m in summary if m not in (GRID, SINGLE_TASK)]
    colours = _COLOURS if len(methods) <= len(_COLOURS) else _many_colours()
    for index, method in enumerate(sorted(methods, key=_method_order)):
        style = {"color": colours[index % len(colours)], "label": METHOD_LABELS.get(method, method)}
        marker = _MARKERS[index % len(_MARKERS)]
        mean = summary[method]["mean"]
        if failed_below is not None and min(mean) < failed_below:
            # A marker with no point: its legend entry keeps its place.
            style["label"] += f": {scale * mean[0]:.2f} / {scale * mean[1]:.2f}, off the axes"
            ax.errorbar([math.nan], [math.nan], fmt=marker, markersize=7, **style)
            continue
        errorbar([summary[method]], fmt=marker, markersize=7, **style)
    if SINGLE_TASK in summary:
        errorbar(
            [summary[SINGLE_TASK]], fmt="*", markersize=14, color="black",
            label=METHOD_LABELS[SINGLE_TASK],
        )


def _many_colours():
    """tab20's twenty colours, its ten hues first (each hue comes as a dark
    and a light shade, adjacent in the map)."""
    cmap = pyplot().get_cmap("tab20")
    return [cmap(index) for index in list(range(0, 20, 2)) + list(range(1, 20, 2))]


def _draw_references(ax, references):
    """Published points as hollow grey markers, each named beside it (they
    are few and may share a legend colour); points that nearly coincide
    share one name, so the names do not print over each other."""
    for label, (x, y) in references.items():
        ax.plot([x], [y], linestyle="none", marker="o", markerfacecolor="none",
                markeredgecolor="0.4", markersize=8, label=label)
    low, high = ax.get_xlim()
    for labels, (x, y) in _coinciding(references):
        # Names of points near the right edge run leftwards, inside the axes.
        side = -1 if x > low + 0.8 * (high - low) else 1
        ax.annotate(", ".join(labels), (x, y), xytext=(5 * side, 5), textcoords="offset points",
                    ha="right" if side < 0 else "left", fontsize="x-small", color="0.3")


def _coinciding(references, tolerance=1e-3):
    """`(labels, point)` per group of points within `tolerance` (relative)
    of the group's first point in both coordinates."""
    groups = []
    for label, point in references.items():
        for labels, first in groups:
            if np.allclose(point, first, rtol=tolerance, atol=0.0):
                labels.append(label)
                break
        else:
            groups.append(([label], point))
    return groups


def _method_order(method):
    """The paper's methods in its order, then the others by name."""
    order = ["mgda_ub", "mgda", "uniform", "uncertainty", "gradnorm"]
    return (order.index(method), "") if method in order else (len(order), method)
