"""CR-MOGM (Zhou et al., NeurIPS 2022): a moving average of any
weighting's task weights."""

import keras

from keras_mgda.types import WeightingLike
from keras_mgda.weighting.base import Weighting
from keras_mgda.weighting.base import call_with_ops
from keras_mgda.weighting.base import get

__all__ = [
    "CRMOGM",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class CRMOGM(Weighting):
    """Smooths another weighting's task weights with an exponential moving
    average across steps.

    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of
    Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS
    2022 (CR-MOGM, correlation-reduced multi-objective gradient
    manipulation). With w_hat_k the wrapped weighting's weights at step k,
    the weights used are

        w_k = alpha w_{k-1} + (1 - alpha) w_hat_k,   w_1 = w_hat_1,

    which reduces the correlation between the stochastic weights and the
    stochastic gradients that makes stochastic MGDA-like methods biased;
    the paper proves convergence for it. The definition is torchjd's
    `CRMOGMWeighting` (alpha on the previous weights; the first output is
    the first inner weights); the paper's Corollary 1 lets alpha_k grow
    towards 1 as the learning rate decays, here it is a constant.

    Everything else is the wrapped weighting's: whether it needs the Gram
    matrix and in which space (`requires_gram`, `gradient_space`), its
    head weights (applied to the smoothed weights), its own objective
    (`loss`), its epoch hook and after-update hook. Its state lives in it
    (the model tracks it through this wrapper), and both are saved in
    `.keras` files: the config holds the wrapped weighting's config. A
    non-finite weight vector leaves the average unchanged (the model skips
    such a step anyway). A `GradientAggregator` (its weights are only
    logged) cannot be wrapped.

    Args:
        weighting: the wrapped `Weighting`, a method's name or a config
            dict (default `"mgda"`, the method the paper studies first).
        alpha: the coefficient of the previous weights, in [0, 1] (0.9,
            torchjd's default; 0 returns the wrapped weights unchanged).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) weights, the moving average.

    Example:

    ```python
    weighting = keras_mgda.weighting.CRMOGM(keras_mgda.weighting.MGDA(), alpha=0.9)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(self, weighting: WeightingLike = "mgda", alpha: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        inner = get(weighting)
        if getattr(inner, "aggregates_gradients", False):
            raise TypeError(
                f"CRMOGM smooths task weights; {type(inner).__name__} aggregates the per-task "
                "gradients (its weights are only logged), so it cannot be wrapped."
            )
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}.")
        self.inner = inner
        self.alpha = float(alpha)

    @property
    def requires_gram(self):
        return self.inner.requires_gram

    @property
    def gradient_space(self):
        return self.inner.gradient_space

    @property
    def needs_losses_after_update(self):
        return getattr(self.inner, "needs_losses_after_update", False)

    @property
    def has_epoch_hook(self):
        return self.inner.has_epoch_hook

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        if self.inner.num_tasks is None:
            self.inner.build(num_tasks, task_names)
        self.average = self.add_state("average", (num_tasks,))
        self.started = self.add_state("started", ())

    def call(self, losses, gram=None, ops=keras.ops):
        fresh = self.inner(losses, gram, ops=ops)
        previous = ops.cast(ops.convert_to_tensor(self.average), fresh.dtype)
        started = ops.convert_to_tensor(self.started) > 0.5
        smoothed = ops.where(started, self.alpha * previous + (1.0 - self.alpha) * fresh, fresh)
        ok = ops.all(ops.isfinite(smoothed))
        self.average.assign(ops.cast(ops.where(ok, smoothed, previous), "float32"))
        self.started.assign(ops.where(ok | started, 1.0, 0.0))
        return smoothed

    def head_weights(self, weights, ops=keras.ops):
        return call_with_ops(self.inner.head_weights, weights, ops=ops)

    def loss(self, losses, gram=None):
        return self.inner.loss(losses, gram)

    def after_update(self, losses, new_losses):
        self.inner.after_update(losses, new_losses)

    def on_epoch_end(self, epoch, logs=None):
        self.inner.on_epoch_end(epoch, logs)

    def get_config(self):
        return {"weighting": keras.saving.serialize_keras_object(self.inner), "alpha": self.alpha}
