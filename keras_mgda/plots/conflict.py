"""Task conflict: the cosines between the tasks' gradients, from the Gram
matrix of a training step."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from keras_mgda.plots._matplotlib import new_axes
from keras_mgda.types import ArrayLike

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["conflict_heatmap", "cosine_matrix"]


def cosine_matrix(gram: ArrayLike) -> np.ndarray:
    """The cosines g_i . g_j / (|g_i| |g_j|) from the Gram matrix M = G G^T.

    Args:
        gram: (T, T) Gram matrix of the task gradients.

    Returns:
        (T, T) float64 NumPy array in [-1, 1]: 1 on the diagonal, 0 against
        a task whose gradient is zero. Negative entries are conflicts.
    """
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    active = norms > 0
    safe = np.where(active, norms, 1.0)
    cosine = gram / safe[:, None] / safe[None, :]
    cosine = np.where(active[:, None] & active[None, :], cosine, 0.0)
    np.fill_diagonal(cosine, 1.0)
    return np.clip(cosine, -1.0, 1.0)


def conflict_heatmap(
    gram: ArrayLike,
    task_names: Sequence[str] | None = None,
    ax: "Axes | None" = None,
    *,
    title: str | None = "Cosine between task gradients",
) -> "Figure":
    """A heatmap of `cosine_matrix(gram)`: red where tasks conflict.

    Args:
        gram: (T, T) Gram matrix of the task gradients (e.g. one recorded by
            `keras_mgda.callbacks.GramRecorder`).
        task_names: the tasks' names, for the ticks.
        ax: a matplotlib Axes to draw on; a new figure when None.
        title: the axes title, or None.

    Returns:
        The matplotlib `Figure` that holds the axes.

    Example:

    ```python
    keras_mgda.plots.conflict_heatmap([[1.0, -0.5], [-0.5, 2.0]], ["left", "right"])
    ```
    """
    cosine = cosine_matrix(gram)
    names = list(task_names) if task_names is not None else [str(i) for i in range(len(cosine))]
    if len(names) != len(cosine):
        raise ValueError(f"{len(names)} task names for a {len(cosine)}x{len(cosine)} Gram matrix.")
    # At least 4 x 3.2 inches: with two tasks the title and the colour
    # bar's label need more room than the cells.
    size = 0.35 * len(names)
    figure, ax = new_axes(ax, (max(4.0, 1.5 + size), max(3.2, 1.0 + size)))
    image = ax.imshow(cosine, cmap="RdBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    label_size = "small" if len(names) <= 10 else "x-small"
    ax.set_xticklabels(names, rotation=90, fontsize=label_size)
    ax.set_yticklabels(names, fontsize=label_size)
    if len(names) <= 10:  # the values, where the cells have room for them
        for (row, column), value in np.ndenumerate(cosine):
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize="small",
                    color="white" if abs(value) > 0.6 else "black")
    figure.colorbar(image, ax=ax, label="cosine")
    if title:
        ax.set_title(title)
    return figure
