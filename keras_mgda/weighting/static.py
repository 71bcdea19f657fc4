"""Static weighting: fixed task weights chosen by the user."""

from collections.abc import Mapping
from collections.abc import Sequence

import keras

from keras_mgda.weighting.base import Weighting
from keras_mgda.weighting.base import per_task_values

__all__ = [
    "Static",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class Static(Weighting):
    """Fixed weights: the step follows sum_t w_t L_t.

    The paper's "grid search" baseline trains one model per weight vector on
    the simplex (see `keras_mgda.grid_search`). Needs no gradients beyond the
    usual backward pass.

    Args:
        weights: one non-negative weight per task, as a list in task order
            or a dict keyed by output name.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Example:

    ```python
    weighting = keras_mgda.weighting.Static({"left": 0.7, "right": 0.3})
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(self, weights: Sequence[float] | Mapping[str, float], **kwargs):
        super().__init__(**kwargs)
        listed = weights.values() if isinstance(weights, dict) else weights
        for value in listed:
            if not (float(value) >= 0.0):
                raise ValueError(
                    f"Static weights must be finite and non-negative; got "
                    f"{weights!r}."
                )
        self.weights_option = (
            dict(weights) if isinstance(weights, dict) else [float(w) for w in weights]
        )

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self._resolved = [
            float(w)
            for w in per_task_values(
                self.weights_option, num_tasks, task_names, "weights"
            )
        ]

    def call(self, losses, gram=None):
        return keras.ops.convert_to_tensor(self._resolved, dtype="float32")

    def get_config(self):
        return {"weights": self.weights_option}
