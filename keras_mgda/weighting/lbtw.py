"""Loss-Balanced Task Weighting (Liu, Liang & Gitter, AAAI 2019)."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "LBTW",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class LBTW(Weighting):
    """Weights from each task's loss relative to its loss at the start of
    the epoch.

    Liu, Liang & Gitter, "Loss-Balanced Task Weighting to Reduce Negative
    Transfer in Multi-Task Learning", AAAI 2019. At every step
    w_t = (L_t / L_t(0)) ^ alpha, where L_t(0) is the task's loss on the
    first batch of the epoch: a task that has already fallen far gets less
    weight. Needs no gradients beyond the usual backward pass.

    Args:
        alpha: the exponent (the paper tries 0.1 to 0.5; 0 is uniform
            weighting with w = 1).
        reset_each_epoch: take L_t(0) from the first batch of every epoch
            (the paper's choice) or only from the first batch of training.
        epsilon: guards the ratio.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.LBTW(alpha=0.5))
    ```
    """

    def __init__(self, alpha: float = 0.5, reset_each_epoch: bool = True, epsilon: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.reset_each_epoch = bool(reset_each_epoch)
        self.epsilon = float(epsilon)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.initial_losses = self.add_state("initial_losses", (num_tasks,))
        self.has_initial = self.add_state("has_initial", ())

    def call(self, losses, gram=None):
        fresh = ops.convert_to_tensor(self.has_initial) < 0.5
        initial = ops.where(fresh, losses, ops.convert_to_tensor(self.initial_losses))
        self.initial_losses.assign(initial)
        self.has_initial.assign(ops.ones((), "float32"))
        ratio = losses / ops.maximum(initial, self.epsilon)
        return ops.power(ops.maximum(ratio, 0.0), self.alpha)

    def on_epoch_end(self, epoch, logs=None):
        if self.reset_each_epoch:
            self.has_initial.assign(0.0)

    def get_config(self):
        return {
            "alpha": self.alpha,
            "reset_each_epoch": self.reset_each_epoch,
            "epsilon": self.epsilon,
        }
