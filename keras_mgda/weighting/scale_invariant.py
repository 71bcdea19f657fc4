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
    w_t = 1 / (L_t + epsilon) (0 once its loss is at most epsilon).

    The scale-invariant ("SI") baseline of Navon et al., "Multi-Task
    Learning as a Bargaining Game", ICML 2022, and of Liu et al., "FAMO:
    Fast Adaptive Multitask Optimization", NeurIPS 2023: the gradient of
    log L_t is g_t / L_t, so rescaling any task's loss by a constant
    leaves the update unchanged. Needs no gradients beyond the usual
    backward pass.

    Degenerate losses: a task whose loss is at most `epsilon` is solved
    (log L_t is -inf there) and gets weight 0 for the step; the guard alone
    would give it 1 / epsilon = 1e8 times its gradient, which a loss with
    a floor or an offset need not make zero. So the update is at most
    sum_t |g_t| / L_t <= T max_t |g_t| / L_t over the other tasks (the log
    losses' own slopes). A negative loss (outside the method's domain) or
    a NaN or infinite one gives a NaN weight, which the model's finiteness
    check catches.

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
        weights = ops.where(losses > self.epsilon, 1.0 / shifted, 0.0)  # a solved task: 0
        return ops.where(ops.isfinite(shifted), weights, float("nan"))

    def get_config(self):
        return {"epsilon": self.epsilon}
