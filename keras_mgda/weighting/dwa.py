"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "DWA",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class DWA(Weighting):
    """Weights from the rate at which each task's loss fell over the last
    two epochs.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019. With L_t(e) the mean training loss of task t over epoch e,
    r_t = L_t(e-1) / L_t(e-2) and w_t(e) = T softmax(r / temperature)_t:
    a task whose loss falls slowly gets more weight. The first two epochs
    use w = 1. The epoch means are accumulated inside the train step and
    rolled over after each epoch of `fit` (`on_epoch_end`). Needs no
    gradients beyond the usual backward pass.

    Args:
        temperature: the softmax temperature (the paper's T = 2); higher is
            closer to uniform.
        epsilon: guards the loss ratio.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.DWA(temperature=2.0))
    ```
    """

    def __init__(self, temperature: float = 2.0, epsilon: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}.")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.loss_sums = self.add_state("loss_sums", (num_tasks,))
        self.step_count = self.add_state("step_count", ())
        # Mean losses of the last two finished epochs, and how many exist.
        self.last_means = self.add_state("last_means", (num_tasks,))
        self.previous_means = self.add_state("previous_means", (num_tasks,))
        self.epochs_seen = self.add_state("epochs_seen", ())

    def current_weights(self):
        """The weights used during the coming epoch, (T,)."""
        ratios = ops.convert_to_tensor(self.last_means) / ops.maximum(
            ops.convert_to_tensor(self.previous_means), self.epsilon
        )
        dynamic = self.num_tasks * ops.softmax(ratios / self.temperature)
        ready = ops.convert_to_tensor(self.epochs_seen) >= 2
        return ops.where(ready, dynamic, ops.ones_like(dynamic))

    def call(self, losses, gram=None):
        self.loss_sums.assign_add(losses)
        self.step_count.assign_add(1.0)
        return self.current_weights()

    def on_epoch_end(self, epoch, logs=None):
        count = ops.maximum(ops.convert_to_tensor(self.step_count), 1.0)
        means = ops.convert_to_tensor(self.loss_sums) / count
        self.previous_means.assign(ops.convert_to_tensor(self.last_means))
        self.last_means.assign(means)
        self.epochs_seen.assign_add(1.0)
        self.loss_sums.assign(ops.zeros((self.num_tasks,), "float32"))
        self.step_count.assign(0.0)

    def get_config(self):
        return {"temperature": self.temperature, "epsilon": self.epsilon}
