"""The per-task losses, read from Keras's own compiled loss.

There is no public per-output loss list in Keras. `CompileLoss` keeps one
entry per output compiled with a loss; wrapping each entry's loss function
to record the value it computes keeps Keras's structure handling,
`sample_weight`, `loss_weights` and the `<output>_loss` trackers, and gives
the step one scalar per task, each depending on its own output only.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import keras

from keras_mgda import _keras
from keras_mgda.step import diagnosis
from keras_mgda.types import Tensor

__all__ = ["RecordingLoss", "record_task_losses", "task_loss_list"]


def _sparse_crossentropy_options(loss_fn: Any) -> dict | None:
    """The options of a Keras sparse categorical cross-entropy (its
    `axis`, `ignore_class`), or None for any other loss."""
    fn = getattr(loss_fn, "fn", loss_fn)
    if fn is not keras.losses.sparse_categorical_crossentropy:
        return None
    return dict(getattr(loss_fn, "_fn_kwargs", None) or {})


class RecordingLoss:
    """Wraps one entry of Keras's `CompileLoss` to keep the value it
    computed in `sink[index]`.

    It also keeps, for the error path only (`keras_mgda.step.diagnosis`),
    references to the task's target, prediction and sample weights; checks
    the class labels of a sparse categorical cross-entropy before the loss
    runs (out of range: the loss is NaN, so that the step stops on every
    backend alike); and tags an exception the loss raises with the task.

    Args:
        loss_fn: the entry's loss function.
        sink: a dict shared by every task's recorder.
        index: the task's index.
    """

    def __init__(self, loss_fn: Callable[..., Tensor], sink: dict[Any, Any], index: int) -> None:
        self.loss_fn = loss_fn
        self.sink = sink
        self.index = index

    def __call__(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        self.sink[diagnosis.data_key(self.index)] = (y_true, y_pred, sample_weight)
        y_true, y_pred = self._checked_labels(y_true, y_pred)
        try:
            value = self.loss_fn(y_true, y_pred, sample_weight)
        except Exception as error:
            setattr(error, diagnosis.TASK_ATTRIBUTE, self.index)
            raise
        self.sink[self.index] = value
        return value

    def _checked_labels(self, y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor]:
        """For a sparse categorical cross-entropy: the labels with those out
        of range replaced by 0, and the prediction NaN for the examples
        that had them, so that the loss is NaN. Elementwise only: XLA fuses
        it into the loss, where a reduction per task would be a kernel of
        its own. Any other loss: both as they are."""
        options = _sparse_crossentropy_options(self.loss_fn)
        if options is None or getattr(y_pred, "shape", None) is None:
            return y_true, y_pred
        axis = options.get("axis", -1)
        classes, ignore_class = y_pred.shape[axis], options.get("ignore_class")
        self.sink[diagnosis.labels_key(self.index)] = (classes, ignore_class)
        valid = diagnosis.labels_in_range(y_true, classes, ignore_class)
        per_example = valid
        if len(valid.shape) == len(y_pred.shape) - 1:
            per_example = keras.ops.expand_dims(valid, axis)
        y_pred = keras.ops.where(per_example, y_pred, float("nan"))
        return keras.ops.where(valid, y_true, 0), y_pred

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loss_fn, name)


def record_task_losses(compile_loss: Any, sink: dict[int, Tensor]) -> tuple[list[str], list[float]]:
    """Makes every task loss of `compile_loss` record its value in `sink`.

    Args:
        compile_loss: the model's `CompileLoss`, built.
        sink: the dict the values go to, keyed by task index.

    Returns:
        `(names, loss_weights)`: the tasks' names and their `loss_weights`
        (1.0 where none was given), in task order.

    Raises:
        ValueError: when no output has a loss.
    """
    entries = _keras.flat_losses(compile_loss)
    if not entries:
        raise ValueError(
            "No output of the model has a loss, so there is no task. "
            "Pass `loss=` to `compile` for the outputs that are tasks."
        )
    for index, entry in enumerate(entries):
        if isinstance(entry.loss, RecordingLoss):
            entry.loss.sink = sink
        else:
            entries[index] = entry._replace(loss=RecordingLoss(entry.loss, sink, index))
    names = [entry.name for entry in entries]
    weights = [1.0 if entry.loss_weights is None else entry.loss_weights for entry in entries]
    return names, weights


def task_loss_list(sink: dict[int, Tensor], loss_weights: Sequence[float], dtype: str) -> list[Tensor]:
    """The per-task losses recorded by the last loss computation, times
    their `loss_weights`.

    Args:
        sink: the dict `record_task_losses` fills.
        loss_weights: one weight per task.
        dtype: the compiled loss's dtype.

    Returns:
        A list of T scalars, each depending on its own output only (so a
        backward from one reaches one head).
    """
    values = []
    for index, weight in enumerate(loss_weights):
        value = keras.ops.cast(sink[index], dtype)
        if not (isinstance(weight, (int, float)) and weight == 1):
            value = value * weight
        values.append(value)
    return values
