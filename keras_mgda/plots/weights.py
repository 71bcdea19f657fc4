"""Task weights over training, from a Keras `History` or its CSV."""

import csv
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from keras_mgda.plots._matplotlib import new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["task_weights"]

SUFFIX = "_alpha"


def _number(text):
    """A CSV cell as a float; CSVLogger writes `NA` for a missing value."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _history_dict(history):
    """`{log name: [value per epoch]}` from a History, a dict or a CSV path
    (as `keras.callbacks.CSVLogger` writes it)."""
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {key: [_number(row[key]) for row in rows] for key in rows[0]} if rows else {}
    if isinstance(history, Mapping):
        return dict(history)
    return dict(history.history)


def task_weights(
    history: Any,
    tasks: Sequence[str] | None = None,
    ax: "Axes | None" = None,
    *,
    title: str | None = "Task weights",
) -> "Figure":
    """Each task's weight (`<task>_alpha`) per epoch, one line per task.

    Args:
        history: what `fit` returned (a `keras.callbacks.History`), its
            `.history` dict, or the path of a CSV written by
            `keras.callbacks.CSVLogger`.
        tasks: the tasks to draw; default every `<task>_alpha` found.
        ax: a matplotlib Axes to draw on; a new figure when None.
        title: the axes title, or None.

    Returns:
        The matplotlib `Figure` that holds the axes.

    Example:

    ```python
    history = model.fit(x, y, epochs=10)
    keras_mgda.plots.task_weights(history).savefig("weights.png")
    ```
    """
    logs = _history_dict(history)
    found = [key[: -len(SUFFIX)] for key in logs if key.endswith(SUFFIX) and not key.startswith("val_")]
    tasks = list(found if tasks is None else tasks)
    missing = [task for task in tasks if f"{task}{SUFFIX}" not in logs]
    if not tasks or missing:
        raise ValueError(
            f"No `<task>_alpha` logs for {missing or 'any task'}: pass the History of a "
            f"keras_mgda model's fit (found logs: {sorted(logs)})."
        )
    figure, ax = new_axes(ax, (6, 4))
    for task in tasks:
        values = logs[f"{task}{SUFFIX}"]
        ax.plot(range(1, len(values) + 1), values, marker=".", label=task)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs, never 1.5
    ax.set_ylabel("task weight (epoch mean)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=max(1, len(tasks) // 10))
    return figure
