"""Dynamic Task Prioritization (Guo, Haque, Huang, Yeung & Fei-Fei, ECCV 2018)."""

from collections.abc import Mapping

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting
from keras_mgda.weighting.base import per_task_values

__all__ = [
    "DTP",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class DTP(Weighting):
    """Focal-loss-style task priorities from a key performance indicator.

    Guo et al., "Dynamic Task Prioritization for Multitask Learning", ECCV
    2018. Each task has a KPI kappa_t in (0, 1] (higher is better, e.g.
    accuracy), smoothed as kappa <- smoothing * kappa + (1 - smoothing) *
    kpi, and the task-level priority w_t = -(1 - kappa_t)^gamma log kappa_t:
    hard tasks (low KPI) get more weight.

    KPIs:
        - `kpi=None` (default): kappa_t = exp(-L_t) from the step's loss,
          updated every step. For crossentropy losses this is the geometric
          mean likelihood of the true labels, a natural accuracy proxy.
        - `kpi={"task": "log name"}`: the KPI of each task is read from the
          epoch logs after each epoch (for example `"left_accuracy"` or
          `"val_left_accuracy"`), clipped to [epsilon, 1]; the weights are
          1 during the first epoch.

    Needs no gradients beyond the usual backward pass.

    Args:
        gamma: the focusing parameter (0 gives -log kappa).
        smoothing: the weight of the previous KPI in the moving average.
        kpi: None, or a dict {task name: log key} naming every task.
        epsilon: the KPI floor.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    ```python
    weighting = keras_mgda.weighting.DTP(
        kpi={"left": "left_accuracy", "right": "right_accuracy"})
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    model.compile("adam", loss=..., metrics={"left": "accuracy", "right": "accuracy"})
    ```
    """

    def __init__(
        self,
        gamma: float = 1.0,
        smoothing: float = 0.9,
        kpi: Mapping[str, str] | None = None,
        epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1); got {smoothing!r}.")
        self.gamma = float(gamma)
        self.smoothing = float(smoothing)
        self.kpi = None if kpi is None else dict(kpi)
        self.epsilon = float(epsilon)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self._kpi_keys = (
            None
            if self.kpi is None
            else per_task_values(self.kpi, num_tasks, task_names, "kpi")
        )
        self.kpis = self.add_state("kpis", (num_tasks,), initializer="ones")
        self.kpi_seen = self.add_state("kpi_seen", ())

    def _priorities(self, kpis):
        kpis = ops.clip(kpis, self.epsilon, 1.0)
        return -ops.power(1.0 - kpis, self.gamma) * ops.log(kpis)

    def call(self, losses, gram=None):
        seen = ops.convert_to_tensor(self.kpi_seen) > 0.5
        if self._kpi_keys is not None:
            # KPIs from the epoch logs: uniform weights until the first one.
            priorities = self._priorities(ops.convert_to_tensor(self.kpis))
            return ops.where(seen, priorities, ops.ones_like(priorities))
        current = ops.exp(-ops.maximum(losses, 0.0))
        previous = ops.convert_to_tensor(self.kpis)
        smoothed = ops.where(
            seen, self.smoothing * previous + (1.0 - self.smoothing) * current, current
        )
        self.kpis.assign(smoothed)
        self.kpi_seen.assign(ops.ones((), "float32"))
        return self._priorities(smoothed)

    def on_epoch_end(self, epoch, logs=None):
        if self._kpi_keys is None:
            return
        logs = logs or {}
        missing = [key for key in self._kpi_keys if key not in logs]
        if missing:
            raise KeyError(
                f"DTP reads its KPIs {self._kpi_keys} from the epoch logs, "
                f"but {missing} are not logged (logs have {sorted(logs)}). "
                "Compile the model with the metrics that produce them."
            )
        current = ops.convert_to_tensor(
            [float(logs[key]) for key in self._kpi_keys], dtype="float32"
        )
        seen = ops.convert_to_tensor(self.kpi_seen) > 0.5
        previous = ops.convert_to_tensor(self.kpis)
        self.kpis.assign(
            ops.where(
                seen,
                self.smoothing * previous + (1.0 - self.smoothing) * current,
                current,
            )
        )
        self.kpi_seen.assign(1.0)

    def get_config(self):
        return {
            "gamma": self.gamma,
            "smoothing": self.smoothing,
            "kpi": self.kpi,
            "epsilon": self.epsilon,
        }
