"""Geometric loss strategy (Chennupati et al., CVPR Workshops 2019)."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "GLS",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class GLS(Weighting):
    """Geometric loss strategy: the step follows the geometric mean of the
    task losses.

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning", CVPR Workshops 2019. The objective is

        (prod_t (L_t + epsilon)) ^ (1 / T) = exp(mean_t log(L_t + epsilon)),

    so the weight of task t is its derivative,
    w_t = exp(mean_s log(L_s + epsilon)) / (T (L_t + epsilon)): each task
    weighs in inverse proportion to its loss, and the update is invariant,
    up to one common factor, to rescaling any single loss. The weights are
    computed in log space, so products of many large or small losses
    neither overflow nor underflow. Needs no gradients beyond the usual
    backward pass.

    Degenerate losses: a task whose loss is at most `epsilon` is solved
    and left out of the product for the step (weight 0): with it, the
    geometric mean is 0 whatever the other tasks do, and the guard alone
    gives the solved task exp(mean log) / epsilon (7e4 for three tasks at
    loss 1 and one at 0) times its gradient. The mean then runs over the
    remaining K tasks, w_t = exp(mean_K log(L + epsilon)) / (K (L_t +
    epsilon)), and the update is at most GM max_t |g_t| / L_t (GM the
    geometric mean of the remaining losses). A negative loss (outside the
    method's domain) or a NaN or infinite one gives NaN weights, which the
    model's finiteness check catches.

    Args:
        epsilon: added to every loss before the logarithm (not in the
            paper; 1e-8, the guard LibMTL and the FAMO authors use in their
            log-loss methods).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, positive.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.GLS())
    ```
    """

    def __init__(self, epsilon: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0; got {epsilon!r}.")
        self.epsilon = float(epsilon)

    def call(self, losses, gram=None):
        losses = ops.cast(losses, "float32")
        logs = ops.log(ops.where(losses >= 0, losses + self.epsilon, float("nan")))
        kept = losses > self.epsilon  # solved tasks leave the product
        count = ops.maximum(ops.sum(ops.cast(kept, "float32")), 1.0)
        mean = ops.sum(ops.where(kept, logs, 0.0)) / count
        weights = ops.where(kept, ops.exp(mean - ops.where(kept, logs, 0.0)) / count, 0.0)
        # An infinite loss makes every weight meaningless (inf - inf).
        return ops.where(ops.all(ops.isfinite(logs)), weights, float("nan"))

    def get_config(self):
        return {"epsilon": self.epsilon}
