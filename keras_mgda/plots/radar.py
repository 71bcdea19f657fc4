"""The per-task radar chart of Sener & Koltun's Figure 2: one closed line
per method over many tasks (e.g. CelebA's 40 attributes)."""

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING

from keras_mgda.plots._matplotlib import new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["radar"]


def radar(
    scores: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str] | None = None,
    ax: "Axes | None" = None,
    *,
    title: str | None = None,
    percent: bool = False,
) -> "Figure":
    """Each method's score on every task, on a polar chart.

    Args:
        scores: `{method: {task: score}}`, e.g. per-attribute error.
        tasks: the tasks, in the order they go round the circle; default
            the first method's, in its order.
        ax: a polar matplotlib Axes to draw on; a new figure when None.
        title: optional axes title.
        percent: multiply the scores by 100 (for fractions).

    Returns:
        The matplotlib `Figure` that holds the axes.

    Example:

    ```python
    scores = {"MGDA-UB": {"Smiling": 0.08, "Male": 0.02, "Young": 0.12},
              "uniform": {"Smiling": 0.09, "Male": 0.02, "Young": 0.13}}
    keras_mgda.plots.radar(scores, title="error per attribute")
    ```
    """
    if not scores:
        raise ValueError("radar needs at least one method's scores.")
    tasks = list(tasks if tasks is not None else next(iter(scores.values())))
    for method, values in scores.items():
        missing = [task for task in tasks if task not in values]
        if missing:
            raise ValueError(f"Method {method!r} has no score for tasks {missing}.")
    figure, ax = new_axes(ax, (7, 7.5), projection="polar")
    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))]
    scale = 100.0 if percent else 1.0
    for method, values in scores.items():
        radii = [scale * float(values[task]) for task in tasks]
        ax.plot(angles + angles[:1], radii + radii[:1], label=method)
    ax.set_xticks(angles)
    ax.set_xticklabels(tasks, fontsize="small" if len(tasks) <= 12 else "x-small")
    if percent:
        ax.yaxis.set_major_formatter("{x:g}%")
    if title:
        ax.set_title(title, pad=18)  # above the task name at the top
    # Below the chart, where the task names round the circle cannot cover
    # it; constrained layout makes room for it inside the figure.
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08),
              ncol=min(3, len(scores)))
    return figure
