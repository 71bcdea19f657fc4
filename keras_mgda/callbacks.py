"""Keras callbacks that look inside the multi-task step: the task-conflict
(Gram) matrices over training, and TensorBoard summaries beside Keras's
own."""

import os
from typing import Any

import keras
import numpy as np

from keras_mgda.plots.conflict import cosine_matrix

__all__ = ["GramRecorder", "TaskTensorBoard"]


def _last_gram(model):
    plan = getattr(model, "step_plan", None)
    if plan is None:
        return None
    return np.array(keras.ops.convert_to_numpy(plan.trackers.gram.gram), dtype=np.float64)


class GramRecorder(keras.callbacks.Callback):
    """Records the Gram matrix of the per-task gradients every N steps.

    The Gram-matrix weightings (MGDA, UPGrad, ...) compute M = G G^T of the
    per-task gradients every step; this keeps a copy of it every
    `every_n_steps` steps, for `keras_mgda.plots.conflict_heatmap` (the
    cosines between the tasks' gradients). Weightings that use only the
    losses compute no Gram matrix: recording then raises a clear error.

    Args:
        every_n_steps: how often to record, in training steps.

    Attributes:
        steps: the global step of each record.
        grams: the recorded (T, T) NumPy Gram matrices.
        task_names: the tasks, in the matrices' order.

    Example:

    ```python
    recorder = keras_mgda.callbacks.GramRecorder(every_n_steps=50)
    model.fit(x, y, epochs=5, callbacks=[recorder])
    keras_mgda.plots.conflict_heatmap(recorder.grams[-1], recorder.task_names)
    ```
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; received {every_n_steps}.")
        self.every_n_steps = int(every_n_steps)
        self.steps: list[int] = []
        self.grams: list[np.ndarray] = []
        self.task_names: list[str] | None = None
        self._step = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._step += 1
        if self._step % self.every_n_steps:
            return
        plan = self.model.step_plan
        if plan is None or not plan.needs_gram:
            raise ValueError(
                "GramRecorder records the Gram matrix the step computes, and this "
                f"model's weighting ({type(self.model.weighting).__name__}) computes none: "
                "use a Gram-matrix weighting such as 'mgda' or 'upgrad'."
            )
        self.task_names = list(plan.task_names)
        self.steps.append(self._step)
        self.grams.append(_last_gram(self.model))

    def cosines(self) -> list[np.ndarray]:
        """The recorded matrices as cosines between the tasks' gradients."""
        return [cosine_matrix(gram) for gram in self.grams]


class TaskTensorBoard(keras.callbacks.Callback):
    """Task weights as one multi-line chart, and the task-conflict heatmap
    as an image, in TensorBoard, beside Keras's `TensorBoard` callback.

    Every `every_n_steps` steps it writes each task's weight (the epoch's
    running mean, as logged) under `task_weights/<task>`, with a custom
    scalars layout that draws them on one chart, and, for Gram-matrix
    weightings, the heatmap of the cosines between the tasks' gradients
    under `task_conflict`. It writes to `<log_dir>/train`, the directory
    Keras's `TensorBoard(log_dir)` uses, so both show up together. Writing
    summaries uses TensorFlow's summary writer (installed with TensorFlow),
    on any Keras backend.

    Args:
        log_dir: the log directory, as for `keras.callbacks.TensorBoard`.
        every_n_steps: how often to write, in training steps.

    Example:

    ```python
    model.fit(x, y, epochs=5, callbacks=[
        keras.callbacks.TensorBoard("logs"),
        keras_mgda.callbacks.TaskTensorBoard("logs", every_n_steps=20)])
    ```
    """

    def __init__(self, log_dir: str = "logs", every_n_steps: int = 100) -> None:
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self.every_n_steps = int(every_n_steps)
        self._step = 0
        self._writer = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._step += 1
        if self._step % self.every_n_steps or self.model.step_plan is None:
            return
        from keras_mgda.backend import summary

        plan = self.model.step_plan
        if self._writer is None:
            self._writer = summary.Writer(os.path.join(self.log_dir, "train"), plan.task_names)
        logs = logs or {}
        weights = {task: logs[f"{task}_alpha"] for task in plan.task_names if f"{task}_alpha" in logs}
        self._writer.weights(weights, self._step)
        if plan.needs_gram:
            self._writer.conflict(cosine_matrix(_last_gram(self.model)), self._step)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
