"""DB-MTL (Lin et al. 2023): dual balancing, log losses and balanced
gradient magnitudes, on the Gram matrix."""

from typing import Literal

import keras

from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import check_choice

__all__ = [
    "DBMTL",
]

HEAD_UPDATES = ("log", "full", "scaled")


@keras.saving.register_keras_serializable(package="keras_mgda")
class DBMTL(GradientWeighting):
    """Dual-balancing multi-task learning.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for
    Multi-Task Learning", arXiv:2308.12029, 2023 (Neural Networks). Two
    balances:

    - loss scale: every task follows its log loss log(L_t + epsilon),
      whose gradient is g_t / (L_t + epsilon);
    - gradient magnitude: each log-loss gradient is rescaled to the
      largest of their norms, so the update is sum_t a_t g_t / (L_t + epsilon),
      a_t = max_s n_s / (n_t + epsilon), with n an exponential moving
      average of the log-loss gradients' norms
      ||g_t|| / (L_t + epsilon) = sqrt(M_tt) / (L_t + epsilon):

          n <- b_k n + (1 - b_k) sqrt(diag(M)) / (L + epsilon),   b_k = beta / k^beta_sigma

      at step k (n starts at 0), as in the authors' code (LibMTL's
      `DB_MTL`). So the weight of task t is w_t = a_t / (L_t + epsilon).

    The paper's (and LibMTL's) moving average is over the gradient vectors
    themselves, and the update combines those averages. Here the update
    combines this step's gradients (one encoder backward, the MGDA-UB
    trick: the per-task gradients with respect to Z are per sample, and an
    average of them over different batches has no meaning), and the
    moving average is over their norms, which is what sets the balance.
    Both agree when each task's gradient keeps its direction across steps.

    Heads: LibMTL backpropagates each log loss through its head, so by
    default (`head_update="log"`) each head gets 1 / (L_t + epsilon) times
    its own gradient; `"full"` gives it its own gradient and `"scaled"`
    w_t times it.

    Args:
        beta: the moving average's coefficient (0.9, LibMTL's default).
        beta_sigma: its decay exponent, b_k = beta / k^beta_sigma (0,
            LibMTL's default: a constant beta).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as LibMTL).
        head_update: `"log"`, `"full"` or `"scaled"` (see above).
        epsilon: the guard inside the logarithm and of the norm ratio
            (1e-8, the authors').
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights a_t / (L_t + epsilon); NaN for
        a non-finite Gram matrix or loss, or a negative loss.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.DBMTL())
    ```
    """

    def __init__(
        self,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["log", "full", "scaled"] = "log",
        epsilon: float = 1e-8,
        **kwargs,
    ):
        check_choice("head_update", head_update, HEAD_UPDATES)
        super().__init__(mode=mode, head_update="full", **kwargs)
        self.head_update = head_update
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1]; got {beta!r}.")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.epsilon = float(epsilon)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.norm_average = self.add_state("norm_average", (num_tasks,))
        self.steps = self.add_state("steps", ())
        # 1 / (L + epsilon) of the last step, for the heads (`head_weights`).
        self.log_slopes = self.add_state("log_slopes", (num_tasks,), initializer="ones")

    def call(self, losses, gram=None, ops=keras.ops):
        gram = ops.cast(ops.stop_gradient(ops.convert_to_tensor(gram)), "float32")
        losses = ops.cast(losses, "float32")
        slopes = 1.0 / ops.where(losses >= 0, losses + self.epsilon, float("nan"))
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0)) * slopes
        steps = ops.convert_to_tensor(self.steps) + 1.0
        beta = self.beta / ops.power(steps, self.beta_sigma)
        average = beta * ops.convert_to_tensor(self.norm_average) + (1.0 - beta) * norms
        weights = ops.max(average) / (average + self.epsilon) * slopes
        ok = ops.all(ops.isfinite(gram)) & ops.all(ops.isfinite(weights))
        for variable, value in ((self.norm_average, average), (self.steps, steps), (self.log_slopes, slopes)):
            variable.assign(ops.where(ok, value, ops.convert_to_tensor(variable)))
        return ops.where(ok, weights, float("nan"))

    def head_weights(self, weights, ops=keras.ops):
        if self.head_update == "full":
            return ops.ones_like(weights)
        if self.head_update == "scaled":
            return weights
        return ops.cast(ops.convert_to_tensor(self.log_slopes), weights.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"beta": self.beta, "beta_sigma": self.beta_sigma, "epsilon": self.epsilon})
        return config
