"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution of the
tasks, solved on the Gram matrix."""

import math
from typing import Literal

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._gradient_base import cap_factor
from keras_mgda.weighting._gradient_base import check_cap

__all__ = ["NashMTL", "bargaining_weights"]

# Step lengths tried at once by the damped Newton line search: 1, 1/2, ...
LINE_SEARCH_STEPS = 16
# Below this squared Newton decrement the full Newton step is taken (the
# quadratically convergent phase of a self-concordant function).
FULL_STEP_DECREMENT = 0.0625


@keras.saving.register_keras_serializable(package="keras_mgda")
class NashMTL(GradientWeighting):
    """Multi-task learning as a bargaining game.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022. The update
    sum_t alpha_t g_t is the Nash bargaining solution among the tasks:
    alpha > 0 with

        (M alpha)_t = 1 / alpha_t   for every task t,

    so that each task's improvement alpha_t g_t . d is the same, and
    ||sum_t alpha_t g_t||^2 = alpha^T M alpha = T. The paper approximates it
    with a sequence of convex programs (cvxpy, 20 iterations). Here alpha
    is the minimiser of the strictly convex function
    f(a) = a^T M a / 2 - sum_t log a_t (its gradient M a - 1 / a vanishes
    exactly at the solution), found by Newton's method with a line search
    over 16 step lengths at once, in the variables alpha_t ||g_t|| (which
    makes it scale-free per task), to float32 precision in a few
    iterations.

    Where no solution exists (the origin is in the convex hull of the
    gradients, so no direction helps every task) f is unbounded below; a
    small ridge, `epsilon` times each task's squared gradient norm added to
    M's diagonal, keeps alpha finite there (about 1/sqrt(epsilon) times its
    usual size) and changes a regular solution by about epsilon.

    Scale: alpha is in units of 1 / ||g||, so scaling M by s scales the
    weights by 1 / sqrt(s). Tasks whose gradient is exactly zero have no
    bargaining position: they get weight 0.

    Degenerate input (cap): near conflicting gradients the bargaining
    weights beta_t = alpha_t ||g_t|| grow without bound (two gradients at
    an angle theta get 1 / sqrt(1 + cos theta)), and with opposite ones
    only the ridge stops them, at about 1 / sqrt(epsilon) = 1000; the
    shared update stays short (its norm is at most sqrt(T)), but the heads
    get alpha_t times their gradient. So beta is scaled down, all tasks
    together, until the largest is `weight_cap` (10: two tasks up to 174
    degrees apart are untouched): every task's term alpha_t ||g_t|| and
    every head's factor times ||g_t|| is at most `weight_cap`, and the
    shared update at most min(sqrt(T), max_norm), whatever the gradients'
    size. The authors' code (cvxpy) fails to solve such a step and keeps
    the previous step's alpha (ones at the first step).

    The authors' code then clips the norm of the shared parameters' gradient
    to `max_norm` (1.0), while the heads keep alpha_t times their gradient.
    Since that norm is exactly sqrt(T) at the solution, this is a constant
    factor here: the weights (shared update) are alpha * min(1, max_norm /
    sqrt(T)), and with `head_update="scaled"` (the default) the heads get
    the unclipped alpha.

    Under plain SGD, mind the mode. The clipped shared update has norm
    min(sqrt(T), max_norm) whatever the gradients' size, and alpha is in
    units of 1 / ||g||. In `"representation"` mode the gradients are those
    of mean losses with respect to Z, small (0.04 on the MultiMNIST LeNet at
    initialisation, batch 256), so the Z-cotangent is some 25 times uniform
    weighting's and the heads (`"scaled"`) get alpha_t, of order
    1 / ||g_t||, times their gradient: with Sener & Koltun's SGD protocol
    (learning rate 0.05) Nash-MTL killed the network in its first epoch,
    as FairGrad did
    (docs/results/multi_mnist.md). The authors clip in parameter space
    (`mode="parameters"`, where the clip bounds the shared weights' step)
    and train with Adam (learning rate 1e-4 in their NYUv2 trainer); with
    SGD use that mode, or an adaptive optimizer.

    `update_weights_every=k` is the authors' option of the same name:
    alpha is solved at steps 0, k, 2k, ... and reused at the steps
    between. The authors clip the shared gradient at every step, and with
    a reused alpha its norm sqrt(alpha^T M alpha) is no longer sqrt(T):
    at those steps the weights are alpha * min(1, max_norm /
    sqrt(alpha^T M alpha)) with this step's M (torchjd's `NashMTL` does
    the same), and the heads (`"scaled"`) get alpha. The last alpha and
    the steps since the solve are state variables, so this works in
    compiled steps and is saved with the model; a NaN or infinite Gram
    matrix still gives NaN weights at a reuse step. The step computes
    the Gram matrix every step anyway, so k > 1 saves only the solve;
    k = 1 (the default) creates no state and is the solve above, bit for
    bit.

    Args:
        max_norm: the clipping norm; 0 or None for no clipping.
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"scaled"` (heads get alpha_t times their gradient, as
            in the paper) or `"full"` (heads get their own gradients).
        max_iters: cap on the Newton iterations.
        epsilon: the relative ridge (see above), > 0; at least the compute
            dtype's machine epsilon (a smaller ridge is lost in rounding and
            leaves Newton's system singular on opposite gradients).
        weight_cap: the largest alpha_t ||g_t|| (see above), > 0; None for
            no cap.
        update_weights_every: solve every this many steps (1, the authors'
            default), an integer >= 1.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, alpha * min(1, max_norm / sqrt(T)).

    Example:

    ```python
    weighting = keras_mgda.weighting.NashMTL()
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(
        self,
        max_norm: float = 1.0,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "scaled",
        max_iters: int = 50,
        epsilon: float = 1e-6,
        update_weights_every: int = 1,
        weight_cap: float | None = 10.0,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if not epsilon > 0:
            raise ValueError(
                f"epsilon must be > 0 (it keeps alpha finite where no bargaining "
                f"solution exists), got {epsilon!r}."
            )
        if int(update_weights_every) != update_weights_every or update_weights_every < 1:
            raise ValueError(f"update_weights_every must be an integer >= 1, got {update_weights_every!r}.")
        self.max_norm = max_norm
        self.max_iters = int(max_iters)
        self.epsilon = float(epsilon)
        self.update_weights_every = int(update_weights_every)
        self.weight_cap = check_cap(weight_cap)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        if self.update_weights_every > 1:  # k = 1: no state, solvable on the host
            self.last_alpha = self.add_state("last_alpha", (num_tasks,))
            self.steps_since_solve = self.add_state("steps_since_solve", ())

    def _clip_factor(self, num_tasks):
        if not self.max_norm:
            return 1.0
        return min(1.0, float(self.max_norm) / math.sqrt(num_tasks))

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        if self.update_weights_every == 1:
            alpha = bargaining_weights(gram, max_iters=self.max_iters, epsilon=self.epsilon, cap=self.weight_cap)
            return gram.finish(alpha * self._clip_factor(gram.num_tasks))
        since = ops.convert_to_tensor(self.steps_since_solve)
        last = ops.cast(ops.convert_to_tensor(self.last_alpha), gram.dtype)
        # keras.ops.cond: one branch runs (jax.lax.cond, tf.cond, a Python if).
        alpha, weights = keras.ops.cond(since < 0.5, lambda: self._solved(gram), lambda: self._reused(gram, last))
        self.last_alpha.assign(ops.cast(ops.where(gram.finite, alpha, last), "float32"))
        self.steps_since_solve.assign(ops.where(since + 1.0 >= self.update_weights_every, 0.0, since + 1.0))
        return weights

    def _solved(self, gram):
        """alpha and the weights of a solve step (`update_weights_every` > 1)."""
        alpha = bargaining_weights(gram, max_iters=self.max_iters, epsilon=self.epsilon, cap=self.weight_cap)
        return alpha, gram.finish(alpha * self._clip_factor(gram.num_tasks))

    def _reused(self, gram, alpha):
        """The last alpha, clipped by the norm of its update with this M."""
        ops = gram.ops
        if not self.max_norm:
            return alpha, gram.finish(alpha)
        squared = nx.dot(alpha, nx.matvec(gram.unit, alpha, ops=ops), ops=ops) * gram.scale
        norm = ops.sqrt(ops.maximum(squared, 0.0))
        factor = ops.where(norm > self.max_norm, self.max_norm / ops.where(norm > 0, norm, 1.0), 1.0)
        return alpha, gram.finish(alpha * factor)

    def head_weights(self, weights, ops=keras.ops):
        if self.head_update == "full":
            return ops.ones_like(weights)
        if self.update_weights_every > 1 and self.num_tasks is not None:  # this step's unclipped alpha
            return ops.cast(ops.convert_to_tensor(self.last_alpha), weights.dtype)
        return weights / self._clip_factor(weights.shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_norm": self.max_norm,
                "max_iters": self.max_iters,
                "epsilon": self.epsilon,
                "update_weights_every": self.update_weights_every,
                "weight_cap": self.weight_cap,
            }
        )
        return config


def bargaining_weights(gram, max_iters=50, epsilon=1e-6, cap=None):
    """alpha > 0 with (M alpha)_t = 1 / alpha_t, for a `GramInput`.

    Solved in beta = alpha * ||g|| (on the unit-gradient Gram matrix C, where
    beta_t (C beta)_t = 1), by damped Newton on f(b) = b^T C b / 2 - sum log b;
    then scaled down together so that max beta <= `cap` (None: no cap).
    """
    ops = gram.ops
    num_tasks = gram.num_tasks
    dtype = gram.dtype
    eps = gram.eps
    corr = gram.ridged_correlation(epsilon)  # identity rows for inactive tasks: beta_t = 1
    abs_corr = ops.abs(corr)
    steps = ops.power(gram.const(0.5), ops.arange(LINE_SEARCH_STEPS, dtype=dtype))

    def objective(b):  # (..., T) -> (...)
        return 0.5 * nx.dot(b, nx.matvec(corr, b, ops=ops), ops=ops) - ops.sum(ops.log(b), axis=-1)

    def newton(beta):
        # matvec, not ops.matmul: Keras's torch matmul computes float64 in float32.
        grad = nx.matvec(corr, beta, ops=ops) - 1.0 / beta
        hessian = corr + nx.diagonal_matrix(1.0 / ops.square(beta), ops=ops)
        direction = -ops.solve(hessian, grad)
        decrement = -ops.sum(grad * direction)
        return direction, decrement

    def cond(beta, decrement, previous):
        # Stop at convergence, or when rounding noise stalls the quadratic
        # convergence of the decrement.
        noise = eps * ops.sum(nx.matvec(abs_corr, beta, ops=ops) * beta + 1.0)
        stalled = (previous < 1e-4) & (decrement > 0.25 * previous)
        return (decrement > eps * noise) & ~stalled

    def body(beta, last_decrement, previous):
        direction, decrement = newton(beta)
        # Longest step keeping beta > 0, then halvings of min(1, 0.99 of it).
        shrinking = direction < 0
        ratio = ops.where(shrinking, beta / ops.where(shrinking, -direction, 1.0), np.inf)
        longest = nx.minimum(0.99 * ops.min(ratio), gram.const(1.0), ops=ops)
        candidates = beta[None, :] + (longest * steps)[:, None] * direction[None, :]
        values = objective(candidates)
        values = ops.where(ops.isfinite(values), values, np.inf)
        best = nx.argmin(values, ops=ops)
        searched = ops.take(candidates, best, axis=0)
        full = beta + direction
        take_full = (decrement < FULL_STEP_DECREMENT) & ops.all(full > 0)
        moved = ops.where(take_full, full, searched)
        moved = ops.where(ops.all(ops.isfinite(moved)), moved, beta)
        return moved, decrement, last_decrement

    # Start on the ray through 1 at its best point: (1^T C 1) s^2 = T.
    total = nx.maximum(ops.sum(corr), gram.const(eps), ops=ops)
    start = ops.sqrt(num_tasks / total) * ops.ones((num_tasks,), dtype=dtype)
    inf = gram.const(np.inf)
    beta, _, _ = ops.while_loop(cond, body, (start, inf, inf), maximum_iterations=max_iters)
    beta = ops.where(gram.active, beta, 0.0)
    beta = beta * cap_factor(beta, cap, ops=ops)
    alpha = beta / gram.norms() / ops.sqrt(gram.scale)
    return ops.where(gram.active, alpha, 0.0)
