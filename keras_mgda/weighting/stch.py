"""Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang,
ICML 2024)."""

from collections.abc import Mapping
from collections.abc import Sequence

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting
from keras_mgda.weighting.base import per_task_values

__all__ = [
    "STCH",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class STCH(Weighting):
    """Smooth Tchebycheff scalarisation: the step follows a smooth maximum
    of the (normalised, log) task losses.

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization", ICML 2024. The objective is

        T mu log sum_t exp(lambda_t h_t / mu),   h_t = log(L_t / n_t + epsilon),

    a smooth approximation of T max_t lambda_t h_t that tightens as mu
    falls, so the weight of task t is

        w_t = T lambda_t softmax(lambda h / mu)_t / (L_t + epsilon n_t):

    the task that lags most (relative to its nadir value n_t) gets most
    weight. This is the form of the authors' multi-task code
    (`STCH_MTL/LibMTL/weighting/STCH.py`, also LibMTL's `STCH`): log losses
    divided by a nadir point n, preference lambda = 1, and the factor T,
    which keeps the weights of h summing to T as in the warm-up. The
    nadir point is measured during a warm-up: for the first
    `warmup_epochs` epochs the update follows sum_t log(L_t + epsilon)
    (w_t = 1 / (L_t + epsilon)), and n_t is the mean loss of task t over
    the last of them; epochs are counted by `fit` (`on_epoch_end`).
    With `warmup_epochs=0` there is no warm-up and n = 1. With
    `log_losses=False`, h_t = L_t / n_t (the paper's general form on the
    losses themselves, ideal point 0): then w_t = T lambda_t
    softmax(lambda h / mu)_t / n_t, T times the gradient of torchjd's
    `STCH(mu, weights=lambda)`. Needs no gradients beyond the usual
    backward pass.

    Degenerate losses (with `log_losses`): a task whose loss is at most
    `epsilon` times its nadir value is solved (its log loss is -inf) and
    gets weight 0 for the step; the guard alone gives it 1 / epsilon =
    1e20 times its gradient (during the warm-up; after it, 0 times 1e20).
    Its share of the smooth maximum is then ~0 anyway. So the update is
    at most T max_t lambda_t |g_t| / L_t over the other tasks (the log
    losses' own slopes; after the warm-up the softmax shares sum to 1).
    A NaN, infinite or (with `log_losses`) negative loss gives NaN weights,
    which the model's finiteness check catches.

    Args:
        mu: the smoothing parameter, > 0 (1.0, the authors' default).
        warmup_epochs: the epochs before STCH starts (5: the authors' code
            warms up for `STCH_warmup_epoch=4` epochs and then one more,
            epoch 4, in which it measures the nadir point; 0: no warm-up).
        log_losses: scalarise log(L / n) (True, the authors' multi-task
            code) or L / n (the paper's general form).
        preference: the preference vector lambda, positive, a list in task
            order or a dict keyed by task name (default 1 for every task).
        epsilon: the guard added inside the logarithm (1e-20, the
            authors').
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, positive.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.STCH(mu=1.0))
    ```
    """

    def __init__(
        self,
        mu: float = 1.0,
        warmup_epochs: int = 5,
        log_losses: bool = True,
        preference: Sequence[float] | Mapping[str, float] | None = None,
        epsilon: float = 1e-20,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not mu > 0:
            raise ValueError(f"mu must be > 0; got {mu!r}.")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0; got {warmup_epochs!r}.")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0; got {epsilon!r}.")
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)
        self.log_losses = bool(log_losses)
        self.preference = None if preference is None else (
            dict(preference) if isinstance(preference, dict) else [float(p) for p in preference]
        )
        self.epsilon = float(epsilon)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        values = [1.0] * num_tasks if self.preference is None else per_task_values(
            self.preference, num_tasks, task_names, "preference"
        )
        if not all(float(p) > 0 for p in values):
            raise ValueError(f"preference must be positive; got {self.preference!r}.")
        self._preference = [float(p) for p in values]
        self.nadir = self.add_state("nadir", (num_tasks,), initializer="ones")
        self.epochs_seen = self.add_state("epochs_seen", ())
        self.loss_sums = self.add_state("loss_sums", (num_tasks,))
        self.step_count = self.add_state("step_count", ())

    def _transformed(self, losses, nadir):
        """h and dh/dL."""
        if self.log_losses:
            losses = ops.where(losses >= 0, losses, float("nan"))
            slopes = ops.where(losses > self.epsilon * nadir, 1.0 / (losses + self.epsilon * nadir), 0.0)
            return ops.log(losses / nadir + self.epsilon), ops.where(ops.isnan(losses), losses, slopes)
        return losses / nadir, 1.0 / nadir

    def call(self, losses, gram=None):
        losses = ops.cast(losses, "float32")
        epochs = ops.convert_to_tensor(self.epochs_seen)
        measuring = ops.cast(epochs == self.warmup_epochs - 1, "float32")
        self.loss_sums.assign(ops.convert_to_tensor(self.loss_sums) + measuring * losses)
        self.step_count.assign(ops.convert_to_tensor(self.step_count) + measuring)
        h, slopes = self._transformed(losses, ops.convert_to_tensor(self.nadir))
        preference = ops.convert_to_tensor(self._preference, "float32")
        weights = losses.shape[0] * preference * ops.softmax(preference * h / self.mu) * slopes
        weights = ops.where(epochs < self.warmup_epochs, slopes, weights)
        return ops.where(ops.all(ops.isfinite(h)), weights, float("nan"))

    def on_epoch_end(self, epoch, logs=None):
        epochs = ops.convert_to_tensor(self.epochs_seen) + 1.0
        means = ops.convert_to_tensor(self.loss_sums) / ops.maximum(ops.convert_to_tensor(self.step_count), 1.0)
        means = ops.maximum(means, self.epsilon)  # a task solved exactly: no zero divisor
        if self.warmup_epochs > 0:
            done = epochs == self.warmup_epochs
            self.nadir.assign(ops.where(done, means, ops.convert_to_tensor(self.nadir)))
        self.epochs_seen.assign(epochs)

    def get_config(self):
        return {
            "mu": self.mu,
            "warmup_epochs": self.warmup_epochs,
            "log_losses": self.log_losses,
            "preference": self.preference,
            "epsilon": self.epsilon,
        }
