"""Uniform weighting: the mean of the task losses."""

import keras

from keras_mgda.weighting.base import Weighting

__all__ = [
    "Uniform",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class Uniform(Weighting):
    """Every task weighs 1/T: the step follows the mean of the task losses.

    The paper's "uniform scaling" baseline. Needs no gradients beyond the
    usual backward pass.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(inputs, outputs,
                                      weighting=keras_mgda.weighting.Uniform())
    ```
    """

    def call(self, losses, gram=None):
        num_tasks = keras.ops.shape(losses)[0]
        return keras.ops.ones_like(losses) / keras.ops.cast(num_tasks, losses.dtype)
