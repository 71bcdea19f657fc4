"""DB-MTL (Lin et al. 2023): dual balancing, log losses and balanced
gradient magnitudes."""

from typing import Literal

import keras

from keras_mgda.weighting._gradient_base import check_choice
from keras_mgda.weighting._gradient_state import GradientState
from keras_mgda.weighting._gradient_state import gradient_scale
from keras_mgda.weighting.extensions import GradientAggregator

__all__ = [
    "DBMTL",
]

HEAD_UPDATES = ("log", "full", "scaled")


@keras.saving.register_keras_serializable(package="keras_mgda")
class DBMTL(GradientState, GradientAggregator):
    """Dual-balancing multi-task learning.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for
    Multi-Task Learning", arXiv:2308.12029, 2023 (Neural Networks). Two
    balances: every task follows its log loss log(L_t + epsilon), whose
    gradient is v_t = g_t / (L_t + epsilon); and an exponential moving
    average of those log-loss gradients,

        b_t <- beta_k b_t + (1 - beta_k) v_t,   beta_k = beta / k^beta_sigma,

    (b_t = 0 at the start, k counting the steps from 1) is stretched to
    the longest: the update is sum_t a_t b_t, a_t = max_s |b_s| /
    (|b_t| + epsilon). This is the authors' code (LibMTL's `DB_MTL`),
    which does not correct the average's bias: from b = 0 the first steps
    are shorter, (1 - beta^k) of a steady step for constant gradients.

    `mode="parameters"` keeps the averages b_t of the shared weights'
    gradients (T times the shared weights, created before the first step)
    and is LibMTL's update exactly. In `mode="representation"` (the
    default, the MGDA-UB trick) the gradients with respect to Z belong to
    different examples at every step, so no average of them has a meaning:
    the average is kept of their norms, n_t <- beta_k n_t + (1 - beta_k)
    |v_t|, and each task's term is this step's gradient stretched to the
    longest averaged norm, max_s n_s g_t / |g_t|. Its length is LibMTL's
    when each task's gradient keeps its direction across steps (then
    |b_t| = n_t); where directions change, LibMTL's average of vectors is
    shorter than the average of their norms, and its terms point along
    the averages, not along this step's gradients.

    Degenerate input: a task whose loss is at most `epsilon` is solved
    (its log loss is -inf; the authors' guard gives it 1 / epsilon = 1e8
    times its gradient, in the average for the next 1 / (1 - beta) steps):
    it is left out of the step, weight 0, its average kept as it was. A
    task whose gradient is zero gets weight 0 in representation mode (its
    direction is undefined; LibMTL stretches its decaying average). So
    every term is at most max_s n_s long, and the update at most
    T max_t |g_t| / L_t (the log losses' own slopes). A negative, NaN or
    infinite loss, or a non-finite gradient, gives NaN weights (the
    model's finiteness check) and leaves the state.

    Logged weights: the length of each task's term over the length of its
    gradient, max_s n_s / |g_t| (in parameters mode max_s |b_s| / |g_t|).
    Heads: LibMTL backpropagates each log loss through its head, so by
    default (`head_update="log"`) each head gets 1 / (L_t + epsilon) times
    its own gradient (0 for a solved task); `"full"` gives it its own
    gradient and `"scaled"` its task's weight times it.

    Args:
        beta: the moving average's coefficient (0.9, LibMTL's default).
        beta_sigma: its decay exponent, beta_k = beta / k^beta_sigma (0,
            LibMTL's default: a constant beta).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as LibMTL).
        head_update: `"log"`, `"full"` or `"scaled"` (see above).
        epsilon: the guard inside the logarithm and of the norm ratio
            (1e-8, the authors').
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call` (representation mode) the (T,) float32 weights
        max_s n_s / |g_t|; from `aggregate` (parameters mode) the update
        and the weights.

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

    @property
    def aggregates_gradients(self):
        """Parameters mode keeps averages of the gradient vectors."""
        return self.mode == "parameters"

    @property
    def needs_gradient_shapes(self):
        return self.mode == "parameters"

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        if self.mode == "representation":
            self.norm_average = self.add_state("norm_average", (num_tasks,))
        self.steps = self.add_state("steps", ())
        # 1 / (L + epsilon) of the last step (0 for a solved task), for the heads.
        self.log_slopes = self.add_state("log_slopes", (num_tasks,), initializer="ones")

    def build_gradient_state(self, shapes):
        self.buffers = [
            self.add_state(f"buffers_{i}", (self.num_tasks,) + tuple(shape)) for i, shape in enumerate(shapes)
        ]

    def _slopes(self, losses, ops):
        """1 / (L + epsilon) for the tasks in the step, 0 for solved ones;
        NaN for a negative loss."""
        losses = ops.cast(losses, "float32")
        valid = ops.where((losses >= 0) & ops.isfinite(losses), losses, float("nan"))
        kept = valid > self.epsilon
        return ops.where(kept, 1.0 / (valid + self.epsilon), ops.where(ops.isnan(valid), valid, 0.0)), kept

    def _rate(self, ops):
        """(beta_k, k) for this step."""
        steps = ops.convert_to_tensor(self.steps) + 1.0
        return self.beta / ops.power(steps, self.beta_sigma), steps

    def _stretch(self, norms, kept, gradient_norms, ops):
        """The longest kept average norm, and the weights max n / |g_t|
        (0 for a solved task or a zero gradient)."""
        longest = ops.max(ops.where(kept, norms, 0.0))
        active = kept & (gradient_norms > 0)
        return longest, ops.where(active, longest / ops.where(active, gradient_norms, 1.0), 0.0)

    def _commit(self, ok, updates, ops):
        for variable, value in updates:
            variable.assign(ops.where(ok, value, ops.convert_to_tensor(variable)))

    def call(self, losses, gram=None, ops=keras.ops):
        if self.mode == "parameters":
            return super().call(losses, gram, ops=ops)  # raises: the step aggregates
        gram = ops.cast(ops.stop_gradient(ops.convert_to_tensor(gram)), "float32")
        slopes, kept = self._slopes(losses, ops)
        gradient_norms = ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0))
        beta, steps = self._rate(ops)
        previous = ops.convert_to_tensor(self.norm_average)
        average = ops.where(kept, beta * previous + (1.0 - beta) * gradient_norms * slopes, previous)
        _, weights = self._stretch(average, kept, gradient_norms, ops)
        ok = ops.all(ops.isfinite(gram)) & ops.all(ops.isfinite(weights)) & ops.all(ops.isfinite(slopes))
        self._commit(ok, ((self.norm_average, average), (self.steps, steps), (self.log_slopes, slopes)), ops)
        return ops.where(ok, weights, float("nan"))

    def aggregate(self, gradients, losses, gram, ops=keras.ops):
        self.check_gradients(gradients)
        scale = gradient_scale(gradients, gram, ops=ops)
        slopes, kept = self._slopes(losses, ops)
        beta, steps = self._rate(ops)
        buffers, squares = [], 0.0
        for g, buffer in zip(gradients, self.buffers, strict=True):
            shape = (self.num_tasks,) + (1,) * (len(buffer.shape) - 1)
            fresh = ops.cast(g, "float32") / scale * ops.reshape(slopes, shape)
            value = ops.where(ops.reshape(kept, shape), beta * buffer.value + (1.0 - beta) * fresh, buffer.value)
            buffers.append(value)
            squares = squares + ops.sum(ops.reshape(ops.square(value), (self.num_tasks, -1)), axis=-1)
        norms = ops.sqrt(squares)
        longest, weights = self._stretch(norms, kept, ops.sqrt(ops.maximum(ops.diagonal(gram), 0.0)), ops)
        balance = ops.where(kept, longest / (norms + self.epsilon), 0.0)
        directions = [
            ops.cast(ops.tensordot(balance, b, axes=1) * scale, g.dtype)
            for g, b in zip(gradients, buffers, strict=True)
        ]
        ok = ops.all(ops.isfinite(gram)) & ops.all(ops.isfinite(norms)) & ops.all(ops.isfinite(slopes))
        self._commit(ok, list(zip(self.buffers, buffers)) + [(self.steps, steps), (self.log_slopes, slopes)], ops)
        return directions, ops.where(ok, weights, float("nan"))

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
