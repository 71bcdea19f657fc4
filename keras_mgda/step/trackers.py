"""The metrics a multi-task step keeps besides Keras's own: each task's
weight, the count of skipped steps, and the first non-finite task."""

import collections
from collections.abc import Iterable
from typing import Any

import keras

from keras_mgda import backend
from keras_mgda.types import Tensor

__all__ = ["FirstNonfiniteTask", "LastGram", "TaskWeightsMean", "Trackers", "make_trackers"]

Trackers = collections.namedtuple("Trackers", ["alpha", "skipped", "nonfinite", "gram"])


class TaskWeightsMean(keras.metrics.Metric):
    """The mean of each task's weight over the steps whose weights are
    finite, logged as `<task>_alpha`.

    One (T,) sum instead of T `Mean` metrics: a step then updates two
    variables whatever the number of tasks (T metrics cost about 5 ms per
    step with 40 tasks in eager torch).

    Args:
        task_names: the tasks' names, in task order.
        split_after_step: whether a compiled step may return the weights
            as one vector that the train function's wrapper splits by
            name (`backend.named_results`): T fewer kernels to compile,
            for one read of the vector after each step.
    """

    def __init__(self, task_names: Iterable[str], split_after_step: bool = False) -> None:
        super().__init__(name="task_weights", dtype="float32")
        self.task_names = list(task_names)
        self.split_after_step = split_after_step
        self.total = self.add_variable(
            shape=(len(self.task_names),),
            initializer="zeros",
            dtype=self.dtype,
            aggregation="sum",
            name="total",
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, aggregation="sum", name="count"
        )

    def update_state(self, weights: Tensor, finite: Tensor | bool) -> None:
        if isinstance(finite, bool):  # eager steps decide on the host
            if finite:
                self.total.assign_add(keras.ops.cast(weights, self.dtype))
                self.count.assign_add(1.0)
            return
        weights = keras.ops.cast(weights, self.dtype)
        self.total.assign_add(keras.ops.where(finite, weights, keras.ops.zeros_like(weights)))
        self.count.assign_add(keras.ops.cast(finite, self.dtype))

    def result_names(self) -> list[str]:
        return [f"{name}_alpha" for name in self.task_names]

    def result(self) -> dict[str, Tensor]:
        means = keras.ops.divide_no_nan(self.total, self.count)
        return backend.named_results(self.result_names(), means, packed=self.split_after_step)


class FirstNonfiniteTask(keras.metrics.Metric):
    """The first non-finite step since the last reset, as state of the
    compiled step: 0 when none, else 1 + the index of the task at fault
    (T + 1 when no single task is: the shared weights' gradients or the
    task weights).

    A compiled step (TensorFlow, JAX) cannot raise, so it records here and
    changes nothing from then on; the train function's wrapper reads it
    after each call and raises (see `phases.nonfinite_error`). A host
    callback from inside the step would cost more than the whole
    weighting. Beside the task, `cause` keeps what was wrong with its data
    (a code of `keras_mgda.step.diagnosis.CAUSES`, 0 for nothing found).
    Logs nothing. Every replica decides alike, so the first replica's
    value is kept under `tf.distribute`.
    """

    def __init__(self) -> None:
        super().__init__(name="first_nonfinite_task", dtype="float32")
        self.task_plus_one = self.add_variable(
            shape=(),
            initializer="zeros",
            dtype=self.dtype,
            aggregation="only_first_replica",
            name="task_plus_one",
        )
        self.cause = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, aggregation="only_first_replica", name="cause"
        )

    def update_state(self, step_ok: Tensor, bad_index: Tensor, cause: Tensor | int = 0) -> None:
        current = self.task_plus_one.value
        first = keras.ops.logical_and(current == 0, keras.ops.logical_not(step_ok))
        value = keras.ops.cast(bad_index, self.dtype) + 1
        self.task_plus_one.assign(keras.ops.where(first, value, current))
        self.cause.assign(keras.ops.where(first, keras.ops.cast(cause, self.dtype), self.cause.value))

    def result(self) -> dict[str, Tensor]:
        return {}


class LastGram(keras.metrics.Metric):
    """The Gram matrix of the last taken step's per-task gradients (zeros
    before one, and for weightings that need none), for
    `keras_mgda.callbacks.GramRecorder`. Logs nothing.

    Args:
        num_tasks: T.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(name="last_gram", dtype="float32")
        self.gram = self.add_variable(
            shape=(num_tasks, num_tasks),
            initializer="zeros",
            dtype=self.dtype,
            aggregation="only_first_replica",
            name="gram",
        )

    def update_state(self, gram: Any) -> None:
        self.gram.assign(keras.ops.cast(gram, self.dtype))

    def result(self) -> dict:
        return {}


def make_trackers(task_names: Iterable[str], split_after_step: bool = False) -> Trackers:
    """The trackers for a compiled set of tasks (`split_after_step`: see
    `TaskWeightsMean`)."""
    task_names = list(task_names)
    return Trackers(
        alpha=TaskWeightsMean(task_names, split_after_step),
        skipped=keras.metrics.Sum(name="skipped_steps"),
        nonfinite=FirstNonfiniteTask(),
        gram=LastGram(len(task_names)),
    )
