"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

from typing import Literal

import keras
from keras import ops

from keras_mgda.weighting.base import GRADIENT_SPACES
from keras_mgda.weighting.base import Weighting

__all__ = [
    "GradNorm",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class GradNorm(Weighting):
    """Learned weights that balance the tasks' gradient norms.

    Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018. With task weights
    w_t (renormalised to sum to T), the weighted gradient norms are
    G_t = w_t ||g_t||; each is pulled towards the common target
    mean(G) * r_t^alpha, where r_t = (L_t / L_t(0)) / mean(L / L(0)) is the
    task's relative inverse training rate. The weights are learned by the
    model's optimizer on sum_t |G_t - target_t| (the targets held constant,
    as in the paper).

    Gradients: the paper takes ||g_t|| for the last shared layer's weights;
    here they come from the Gram matrix, with respect to the shared
    representation Z (`mode="representation"`, one backward through the
    encoder, the MGDA-UB trick) or the shared weights (`"parameters"`).
    The learned variable is renormalised when read (w = T v / sum v, v
    clipped at 0) rather than after each update; the weights always sum
    to T.

    Args:
        alpha: the asymmetry; higher pulls harder towards balanced training
            rates (the paper uses 0.12 to 3; 1.5 is its NYUv2 choice).
        mode: `"representation"` or `"parameters"`.
        epsilon: guards the divisions.
        **kwargs: passed to `keras.layers.Layer`.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.GradNorm(alpha=1.5))
    ```
    """

    requires_gram = True

    def __init__(
        self,
        alpha: float = 1.5,
        mode: Literal["representation", "parameters"] = "representation",
        epsilon: float = 1e-8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in GRADIENT_SPACES:
            raise ValueError(f"Unknown mode {mode!r}; use one of {GRADIENT_SPACES}.")
        self.alpha = float(alpha)
        self.mode = mode
        self.epsilon = float(epsilon)

    @property
    def gradient_space(self):
        return self.mode

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.raw_weights = self.add_weight(
            name="raw_weights",
            shape=(num_tasks,),
            initializer="ones",
            dtype="float32",
            trainable=True,
        )
        self.initial_losses = self.add_state("initial_losses", (num_tasks,))
        self.seen_first_step = self.add_state("seen_first_step", ())

    def _normalized(self):
        raw = ops.maximum(ops.convert_to_tensor(self.raw_weights), 0.0)
        total = ops.maximum(ops.sum(raw), self.epsilon)
        return raw * (self.num_tasks / total)

    def call(self, losses, gram=None):
        first = ops.convert_to_tensor(self.seen_first_step) < 0.5
        self.initial_losses.assign(
            ops.where(first, losses, ops.convert_to_tensor(self.initial_losses))
        )
        self.seen_first_step.assign(ops.ones((), "float32"))
        return self._normalized()

    def loss(self, losses, gram=None):
        weights = self._normalized()
        norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        weighted_norms = weights * norms
        ratios = losses / ops.maximum(
            ops.convert_to_tensor(self.initial_losses), self.epsilon
        )
        relative = ratios / ops.maximum(ops.mean(ratios), self.epsilon)
        target = ops.stop_gradient(
            ops.mean(weighted_norms) * ops.power(relative, self.alpha)
        )
        return ops.sum(ops.abs(weighted_norms - target))

    def head_weights(self, weights):
        return weights

    def get_config(self):
        return {"alpha": self.alpha, "mode": self.mode, "epsilon": self.epsilon}
