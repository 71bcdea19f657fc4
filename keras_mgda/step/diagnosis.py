"""What was wrong with a bad step's data, found on the error path only.

A step goes bad in two ways: a loss (or gradient) is NaN or Inf, or a
task's loss raises (torch's binary cross-entropy refuses NaN predictions,
a custom loss has a bug). Either way the error names the task and, where
the task's data explains it, says how, the same on every backend and
whether the step is compiled or eager:

- its target, its prediction or its sample weights hold NaN or Inf, or
  (with no single task at fault) the input features do:
  `FloatingPointError`;
- its target holds class labels out of range (sparse categorical
  cross-entropy; checked before the loss runs, since TensorFlow and torch
  raise their own errors on them and JAX's one-hot encoding silently
  gives such an example a loss of 0): `ValueError`;
- anything else a loss raises: the original error's type, its message
  prefixed with the task.

`RecordingLoss` keeps each task's target, prediction and sample weights
of the step (references, no copies) and tags an exception a loss raises
with its task. The compiled steps run `diagnose` inside a branch taken
only by a bad step and record its answer beside the non-finite flag; the
eager torch step and the exception paths run it on the host.
"""

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_mgda.types import Ops
from keras_mgda.types import Tensor

__all__ = [
    "CAUSES",
    "INPUTS",
    "LABELS",
    "PREDICTION",
    "SAMPLE_WEIGHT",
    "TARGET",
    "data_key",
    "diagnose",
    "error_for",
    "labels_key",
    "labels_in_range",
    "on_bad_step",
    "renamed_for_task",
    "task_exception",
    "task_predictions",
]

# Cause codes. A task's target, labels or sample weights come first, then
# the input features (no single task at fault), then a task's prediction.
SAMPLE_WEIGHT, PREDICTION, TARGET, LABELS, INPUTS = 1, 2, 3, 4, 5
CAUSES = {
    SAMPLE_WEIGHT: "its sample weights hold NaN or Inf",
    PREDICTION: "its prediction holds NaN or Inf",
    TARGET: "its target holds NaN or Inf",
    LABELS: "its target holds class labels outside [0, {classes})",
    INPUTS: "the input features hold NaN or Inf",
}
UNCHANGED = "no weight, optimizer state, BatchNorm statistic or metric was changed"
# The attribute that tags an exception raised by a task's loss.
TASK_ATTRIBUTE = "_keras_mgda_task"


def data_key(index: int) -> tuple[str, int]:
    """Where `RecordingLoss` keeps task `index`'s (target, prediction,
    sample weights) in the plan's `recorded` dict."""
    return ("data", index)


def labels_key(index: int) -> tuple[str, int]:
    """Where it keeps the (number of classes, ignore_class) of task
    `index`'s sparse categorical cross-entropy."""
    return ("labels", index)


def labels_in_range(y_true: Tensor, classes: int, ignore_class: int | None) -> Tensor:
    """Which labels lie in [0, classes) (or equal `ignore_class`), with the
    array's own operators (each `keras.ops` call costs a dispatch in eager
    torch, and the loss checks every task's labels every step)."""
    valid = (y_true >= 0) & (y_true < classes)
    if ignore_class is not None:
        valid = valid | (y_true == ignore_class)
    return valid


def _non_finite(value: Any, ops: Ops) -> Tensor | bool:
    """Whether a float tensor holds NaN or Inf (False for None or integers)."""
    if value is None or "float" not in str(getattr(value, "dtype", "float")):
        return False
    return ops.logical_not(ops.all(ops.isfinite(value)))


def _batchable_shape(value: Any) -> tuple | None:
    """The static shape of `value` when it is known past the batch axis
    (the tasks' values share the batch's size), else None."""
    shape = tuple(getattr(value, "shape", None) or ())
    if not shape or any(dim is None for dim in shape[1:]):
        return None
    return shape


def _flags_each(values: list, check: Callable, keys: list, ops: Ops) -> Tensor:
    """(len(values),) bool: `check` of each value (False for None), run once
    per group of values with the same shape, dtype and key, stacked: one
    reduction per group where one per value would be a kernel of its own
    in a compiled step.

    Args:
        values: tensors or None.
        check: maps a stacked (k, ...) group (and its key) to (k,) bools.
        keys: a hashable per value: only values with equal keys share a
            check (the label range of each task's loss).
        ops: the array namespace.
    """
    groups = {}
    for index, value in enumerate(values):
        if value is not None:
            shape = _batchable_shape(value)
            group = (shape, str(value.dtype), keys[index]) if shape is not None else ("alone", index)
            groups.setdefault(group, []).append(index)
    order, parts = [], []
    for members in groups.values():
        key = keys[members[0]]
        parts.append(check(ops.stack([values[i] for i in members]), key))
        order += members
    placed = set(order)
    missing = [i for i in range(len(values)) if i not in placed]
    parts.append(ops.zeros((len(missing),), "bool"))
    position = np.argsort(np.array(order + missing, "int32")).astype("int32")
    return ops.take(ops.concatenate([ops.cast(part, "bool") for part in parts]), position)


def _not_all_per_row(valid: Tensor, ops: Ops) -> Tensor:
    """(k,) bool from a stacked (k, ...) bool: whether any entry of each row
    is False."""
    if len(valid.shape) == 1:
        return ops.logical_not(valid)
    # One axis after a reshape: Keras < 3.11's torch `all` misreads several.
    rest = valid.shape[1:]
    width = int(np.prod(rest)) if all(dim is not None for dim in rest) else -1
    rows = ops.reshape(valid, (valid.shape[0], width))
    return ops.logical_not(ops.all(rows, axis=1))


def _non_finite_each(values: list, ops: Ops) -> Tensor:
    """Which float values hold NaN or Inf ((len(values),) bool)."""
    floats = [v if v is not None and "float" in str(getattr(v, "dtype", "float")) else None for v in values]

    def check(stacked, _):
        return _not_all_per_row(ops.isfinite(stacked), ops)

    return _flags_each(floats, check, [None] * len(values), ops)


def _data_causes(recorded: dict, num_tasks: int, ops: Ops) -> Tensor:
    """(T,) int32: the cause code of each task's target, labels or sample
    weights (0: nothing found); labels come first, then the target, then
    the sample weights."""
    data = [recorded.get(data_key(i), (None, None, None)) for i in range(num_tasks)]
    labels = [recorded.get(labels_key(i)) for i in range(num_tasks)]
    targets = [d[0] for d in data]
    sample_weights = _non_finite_each([d[2] for d in data], ops)
    targets_bad = _non_finite_each(targets, ops)

    def check(stacked, key):
        return _not_all_per_row(labels_in_range(stacked, *key), ops)

    with_labels = [t if key is not None else None for t, key in zip(targets, labels, strict=True)]
    labels_bad = _flags_each(with_labels, check, labels, ops)
    code = ops.where(sample_weights, SAMPLE_WEIGHT, 0)
    code = ops.where(targets_bad, TARGET, code)
    return ops.cast(ops.where(labels_bad, LABELS, code), "int32")


def _first(codes: Tensor, ops: Ops) -> tuple[Tensor, Tensor]:
    """Whether any code is set, and the index of the first that is."""
    set_ = ops.cast(codes > 0, "int32")
    return ops.any(codes > 0), ops.cast(ops.argmax(set_), "int32")


def diagnose(
    recorded: dict, num_tasks: int, inputs: Any, predictions: list | None = None, *, ops: Ops = keras.ops
) -> tuple[Tensor, Tensor]:
    """The task whose data explains a bad step, and how; works inside
    compiled steps.

    A task's target, labels or sample weights are looked at first (the
    first such task in task order), then the input features, then the
    tasks' predictions.

    Args:
        recorded: the plan's `recorded` dict, after the step's losses.
        num_tasks: T.
        inputs: the batch's input features (a structure of tensors).
        predictions: the tasks' predictions, one per task, from outside
            any autodiff transformation (JAX's losses run inside one); None:
            those the losses saw.
        ops: the array namespace.

    Returns:
        `(task, cause)` int32 scalars: the task's index (T when no single
        task is at fault) and a code of `CAUSES` (0 when nothing is found).
    """
    if predictions is None:
        predictions = [recorded.get(data_key(i), (None, None, None))[1] for i in range(num_tasks)]
    data_codes = _data_causes(recorded, num_tasks, ops)
    data_found, data_task = _first(data_codes, ops)
    data_code = ops.take(data_codes, data_task)
    prediction_codes = ops.cast(_non_finite_each(list(predictions), ops), "int32")
    prediction_found, prediction_task = _first(prediction_codes, ops)
    inputs_bad = ops.convert_to_tensor(False)
    for value in keras.tree.flatten(inputs):
        inputs_bad = ops.logical_or(inputs_bad, _non_finite(value, ops))
    task = ops.where(data_found, data_task, ops.where(inputs_bad | ~prediction_found, num_tasks, prediction_task))
    cause = ops.where(data_found, data_code, ops.where(inputs_bad, INPUTS, ops.where(prediction_found, PREDICTION, 0)))
    return ops.cast(task, "int32"), ops.cast(cause, "int32")


def task_predictions(y_pred: Any, task_outputs: list[int]) -> list:
    """Each task's prediction: the output its loss reads."""
    flat = keras.tree.flatten(y_pred)
    return [flat[i] for i in task_outputs]


def on_bad_step(
    recorded: dict,
    num_tasks: int,
    inputs: Any,
    predictions: list,
    step_ok: Tensor,
    bad_index: Tensor,
    *,
    ops: Ops = keras.ops,
) -> tuple[Tensor, Tensor]:
    """`diagnose`, computed only when the step is bad (in a branch of a
    compiled step): the task to name (the diagnosed one, else the step's
    `bad_index`) and the cause code."""

    def bad():
        task, cause = diagnose(recorded, num_tasks, inputs, predictions, ops=ops)
        return ops.where(cause > 0, task, ops.cast(bad_index, "int32")), cause

    def good():
        return ops.cast(bad_index, "int32"), ops.convert_to_tensor(0, "int32")

    return keras.ops.cond(step_ok, good, bad)


def _classes(recorded: dict, index: int) -> str:
    labels = recorded.get(labels_key(index))
    return "C" if labels is None else str(labels[0])


def error_for(task_names: list[str], task: int, cause: int, recorded: dict) -> Exception:
    """The error of a bad step, with what `diagnose` found.

    Args:
        task_names: the tasks' names.
        task: the task at fault, or T for none.
        cause: a code of `CAUSES`, or 0 for none found.
        recorded: the plan's `recorded` dict (for the number of classes).

    Returns:
        A `ValueError` for labels out of range, else a `FloatingPointError`;
        the message ends in "Task: <name>" (or "Task: none (...)").
    """
    task, cause = int(task), int(cause)
    named = task < len(task_names)
    if named:
        where = task_names[task]
    elif cause == INPUTS:
        where = "none (the input features)"
    else:
        where = "none (the shared weights' gradient or the task weights)"
    if cause == LABELS:
        reason = CAUSES[LABELS].format(classes=_classes(recorded, task))
        return ValueError(
            f"keras_mgda: task {where!r}: {reason} at this step; {UNCHANGED}. Check the labels of that "
            f"output, or pass `ignore_class` to its loss for labels to skip. Task: {where}"
        )
    reason = f" ({f'task {where!r}: ' if named else ''}{CAUSES[cause]})" if cause else ""
    return FloatingPointError(
        f"keras_mgda: a loss or gradient is NaN or Inf at this step{reason}; {UNCHANGED}. Check the data "
        "and the loss of that task, lower the learning rate, or compile with on_nonfinite='skip' to skip "
        f"such steps. Task: {where}"
    )


def _concrete(recorded: dict) -> bool:
    """Whether the recorded tensors hold values (an eager step), not
    symbols of a trace."""
    for value in recorded.values():
        for tensor in keras.tree.flatten(value):
            if hasattr(tensor, "shape") and not isinstance(tensor, (bool, np.bool_)):
                try:
                    keras.ops.convert_to_numpy(tensor)
                except Exception:
                    return False
                return True
    return False


def task_exception(task_names: list[str], error: BaseException, recorded: dict, inputs: Any) -> BaseException:
    """What to raise for an exception that escaped a step.

    An exception a task's loss raised (tagged by `RecordingLoss`) becomes
    the data error `diagnose` finds on the host when the step was eager
    (a NaN prediction behind torch's cross-entropy), or else the same
    type with the task named. Any other exception is returned as it is.

    Args:
        task_names: the tasks' names.
        error: the exception.
        recorded: the plan's `recorded` dict.
        inputs: the batch's input features.

    Returns:
        The exception to raise (chain it to `error`).
    """
    index = getattr(error, TASK_ATTRIBUTE, None)
    if index is None:
        return error
    if _concrete(recorded):
        task, cause = diagnose(recorded, len(task_names), inputs)
        if int(cause):
            return error_for(task_names, task, cause, recorded)
    return renamed_for_task(error, task_names[index])


def renamed_for_task(error: BaseException, task: str, what: str = "loss") -> BaseException:
    """`error` with the task named: the same type, its message prefixed
    (where the type cannot be rebuilt from a message, as TensorFlow's
    OpError, the error itself with the message as a note).

    Args:
        error: the exception.
        task: the task's name.
        what: "loss" or "metric".

    Returns:
        The exception to raise (chain it to `error`).
    """
    return _renamed(error, f"keras_mgda: the {what} of task {task!r} raised: {error} Task: {task}")


def _renamed(error: BaseException, message: str) -> BaseException:
    """`error`'s type with `message`; where that type cannot be built from a
    message alone (TensorFlow's OpError), the error itself with the message
    as a note."""
    try:
        renamed = type(error)(message)
    except Exception:
        renamed = None
    if renamed is None or str(renamed) not in (message, repr(message)):  # KeyError quotes its message
        if hasattr(error, "add_note"):
            error.add_note(message)
        return error
    return renamed
