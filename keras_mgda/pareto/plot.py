"""Drawing a `ParetoFront` with matplotlib (imported only when drawing)."""

import itertools

import numpy as np

__all__ = ["plot_front"]


def _values(front, metric):
    if metric is None:
        return front.losses, "loss"
    return front.metric_values(metric), metric


def _draw_pair(front, ax, values, label, pair):
    i, j = pair
    start = np.flatnonzero(front.direction_index == -1)
    for k, beta in enumerate(front.directions):
        members = np.flatnonzero(front.direction_index == k)
        members = members[np.argsort(front.step_index[members], kind="stable")]
        path = np.concatenate([start[:1], members])  # each direction leaves from the start
        betas = ", ".join(f"{b:g}" for b in beta)
        ax.plot(values[path, i], values[path, j], "o-", markersize=4, label=f"beta = ({betas})")
    ax.plot(values[start, i], values[start, j], "k*", markersize=14, label="start")
    ax.set_xlabel(f"{front.task_names[i]} {label}")
    ax.set_ylabel(f"{front.task_names[j]} {label}")
    ax.legend(fontsize="small")
    return ax


def plot_front(front, ax=None, tasks=(0, 1), metric=None):
    """Draws the explored points in loss or metric space.

    Each direction is a line of markers from the start (a black star)
    through its steps in order.

    Args:
        front: a `ParetoFront`.
        ax: a matplotlib `Axes` (default: a new figure's).
        tasks: the pair of task indices on the x and y axes, or `"all"`
            for every pair, each on its own axes of a new figure (the
            pairwise projections of a front of 3 or more tasks).
        metric: None for the losses, or a metric name: the values of the
            keys `<task>_<metric>` of `front.metrics` (e.g. `"accuracy"`).

    Returns:
        The `Axes`, or for `tasks="all"` the list of them.

    Example:

    ```python
    ax = front.plot(metric="accuracy")
    ax.figure.savefig("front.png")
    ```
    """
    import matplotlib.pyplot as plt

    values, label = _values(front, metric)
    if tasks == "all":
        pairs = list(itertools.combinations(range(len(front.task_names)), 2))
        figure, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
        return [_draw_pair(front, a, values, label, p) for a, p in zip(axes[0], pairs, strict=True)]
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    return _draw_pair(front, ax, values, label, tuple(tasks))
