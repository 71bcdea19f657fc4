"""Scale-invariant linear scalarisation: the sum of the log losses."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "ScaleInvariant",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class ScaleInvariant(Weighting):
    """The step follows sum_t log(L_t + epsilon): each task weighs
    w_t = 1 / (L_t + epsilon).

    The scale-invariant ("SI") baseline of Navon et al., "Multi-Task
    Learning as a Bargaining Game", ICML 2022, and of Liu et al., "FAMO:
    Fast Adaptive Multitask Optimization", NeurIPS 2023: the gradient of
    log L_t is g_t / L_t, so rescaling any task's loss by a constant
    leaves the update unchanged. Needs no gradients beyond the usual
    backward pass.

    Degenerate losses: `epsilon` keeps a zero loss finite (weight
    1 / epsilon, times that task's gradient, which vanishes at a minimum);
    a negative loss (outside the method's domain) or a NaN or infinite one
    gives a NaN weight, which the model's finiteness check catches.

    Args:
        epsilon: added to every loss before the logarithm (the Nash-MTL
            authors' `ScaleInvariantLinearScalarization` takes log(L) as
            is; 1e-8 is the guard FAMO's and DB-MTL's code add inside
            their logarithms).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights 1 / (L_t + epsilon).

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.ScaleInvariant())
    ```
    """

    def __init__(self, epsilon: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0; got {epsilon!r}.")
        self.epsilon = float(epsilon)

    def call(self, losses, gram=None):
        losses = ops.cast(losses, "float32")
        shifted = ops.where(losses >= 0, losses + self.epsilon, float("nan"))
        return ops.where(ops.isfinite(shifted), 1.0 / shifted, float("nan"))

    def get_config(self):
        return {"epsilon": self.epsilon}
