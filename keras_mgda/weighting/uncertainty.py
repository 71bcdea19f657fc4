"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "Uncertainty",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class Uncertainty(Weighting):
    """Homoscedastic-uncertainty weighting with learned log-variances.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018. Each task t has a
    learned s_t = log sigma_t^2; the objective is
    sum_t L_t / (2 sigma_t^2) + log sigma_t, so the weight of task t is
    w_t = 1 / (2 sigma_t^2) = exp(-s_t) / 2, and the optimizer learns s_t
    beside the model (d/ds_t = (1 - exp(-s_t) L_t) / 2: sigma_t^2 tends to
    the task's loss). The regression form is used for every task, as most
    reimplementations do (the paper's classification form drops the 1/2).
    Needs no gradients beyond the usual backward pass.

    Args:
        initial_log_variance: the starting s_t (0: every weight starts at
            1/2).
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.Uncertainty())
    ```
    """

    def __init__(self, initial_log_variance: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_log_variance = float(initial_log_variance)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.log_variances = self.add_weight(
            name="log_variances",
            shape=(num_tasks,),
            initializer=keras.initializers.Constant(self.initial_log_variance),
            dtype="float32",
            trainable=True,
        )

    def call(self, losses, gram=None):
        return 0.5 * ops.exp(-ops.convert_to_tensor(self.log_variances))

    def loss(self, losses, gram=None):
        log_variances = ops.convert_to_tensor(self.log_variances)
        return ops.sum(0.5 * ops.exp(-log_variances) * losses + 0.5 * log_variances)

    def get_config(self):
        return {"initial_log_variance": self.initial_log_variance}
