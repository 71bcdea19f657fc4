"""FairGrad (Ban & Ji, ICML 2024): alpha-fair resource allocation among the
tasks, solved exactly on the Gram matrix."""

from typing import Literal

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._gradient_base import cap_factor
from keras_mgda.weighting._gradient_base import check_cap

__all__ = ["FairGrad", "fair_weights"]

# Step lengths tried at once by the damped Newton line search: 1, 1/2, ...
LINE_SEARCH_STEPS = 16
# Below this squared Newton decrement the full Newton step is taken.
FULL_STEP_DECREMENT = 0.0625


@keras.saving.register_keras_serializable(package="keras_mgda")
class FairGrad(GradientWeighting):
    """Fair resource allocation in multi-task learning.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
    The update d = sum_i w_i g_i maximises the alpha-fair utility
    sum_i u_alpha(g_i . d) of the tasks' improvements within a ball; its
    weights w > 0 solve (the paper's Eq. 4)

        (M w)_i = w_i^(-1/alpha)   for every task i,

    so g_i . d = w_i^(-1/alpha): alpha = 1 is proportional fairness (the
    Nash bargaining solution of `NashMTL`), large alpha approaches max-min
    fairness, alpha -> 0 the average gradient. The authors' code (and
    LibMTL, torchjd) solve Eq. 4 with `scipy.optimize.least_squares` from
    w = 1/T at its default tolerances. Here w is the minimiser of the
    strictly convex f(w) = w^T M w / 2 - sum_i h(w_i), with h' = w^(-1/alpha)
    (its gradient vanishes exactly at the solution), found by Newton's
    method with a line search over 16 step lengths at once, in the
    variables w_i ||g_i||, to working precision (the equations hold to
    ~1e-6 of the size of their terms in float32, to rounding in float64).

    Where no solution exists (the origin is in the convex hull of the
    gradients: no direction helps every task) f is unbounded below; a small
    ridge, `epsilon` times each task's squared gradient norm added to M's
    diagonal, keeps w finite there and changes a regular solution by about
    epsilon (relative). Tasks whose gradient is exactly zero get weight 0.

    Degenerate input (cap): with opposite gradients only the ridge stops
    the weights (about 1 / sqrt(epsilon) = 1000 times their usual size at
    alpha = 1), and near-opposite ones get large weights too. So the
    weights are scaled down together until none exceeds `weight_cap` (100)
    times its value for orthogonal gradients of the same norms,
    ||g_i||^(-2 alpha / (alpha + 1)); at alpha = 1 that is w_i ||g_i|| <=
    `weight_cap` (two tasks up to 179 degrees apart are untouched), and
    the update is at most sqrt(T) long, whatever the gradients' size. At
    alpha != 1 conflicting tasks whose norms lie orders of magnitude apart
    reach that ratio legitimately (up to 68 measured on 10 and 40 tasks
    with norms 1e-4 to 1e4), hence the cap of 100 rather than Nash-MTL's
    10. The authors' least squares stops wherever its iterations end on
    such a step.

    Scale: scaling M by s scales the weights by s^(-alpha / (alpha + 1)).
    The update is not normalised to the gradients' size: at alpha = 1 it
    has norm sqrt(T) in the space M is taken in, however small the
    gradients. In `"representation"` mode those are gradients of mean
    losses with respect to Z, small (0.04 on the MultiMNIST LeNet at
    initialisation, batch 256), so with plain SGD the step can be tens of
    times uniform weighting's: on MultiMNIST with Sener & Koltun's SGD
    protocol (learning rate 0.05) FairGrad killed the network in its first
    epoch (docs/results/multi_mnist.md). FairGrad's authors work on the
    shared parameters and clip their gradient to norm 1 (their
    `max_norm`); with SGD, use `mode="parameters"` and the optimizer's
    `global_clipnorm`, or an adaptive optimizer.

    Task heads keep their plain gradients (`head_update="full"`), as in the
    authors' code, which overwrites only the shared parameters' gradients.

    Args:
        alpha: the fairness parameter, > 0 (default 1.0, the authors' code;
            their CelebA and QM9 runs use 2.0).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        max_iters: cap on the Newton iterations.
        epsilon: the relative ridge (see above), > 0; at least the compute
            dtype's machine epsilon (a smaller ridge is lost in rounding and
            leaves Newton's system singular on opposite gradients).
        weight_cap: the largest weight of the unit-scaled problem (see
            above), > 0; None for no cap.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights w.

    Example:

    ```python
    weighting = keras_mgda.weighting.FairGrad(alpha=2.0)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(
        self,
        alpha: float = 1.0,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        max_iters: int = 50,
        epsilon: float = 1e-6,
        weight_cap: float | None = 100.0,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if not (0 < alpha < float("inf")):
            raise ValueError(f"alpha must be finite and > 0, got {alpha!r}.")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (it keeps w finite where Eq. 4 has no solution), got {epsilon!r}.")
        self.alpha = float(alpha)
        self.max_iters = int(max_iters)
        self.epsilon = float(epsilon)
        self.weight_cap = check_cap(weight_cap)

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        weights = fair_weights(
            gram, self.alpha, max_iters=self.max_iters, epsilon=self.epsilon, cap=self.weight_cap
        )
        return gram.finish(weights)

    def get_config(self):
        config = super().get_config()
        config.update({
            "alpha": self.alpha, "max_iters": self.max_iters, "epsilon": self.epsilon, "weight_cap": self.weight_cap,
        })
        return config


class _Objective:
    """f(b) = b^T C b / 2 - sum_i c_i h(b_i) in b = w ||g|| (unit scale),
    with c_i = ||g_i||^(1/alpha - 1) and h' = b^(-1/alpha): its gradient
    C b - c b^(-1/alpha) is ||g|| times M w - w^(-1/alpha)."""

    def __init__(self, gram, alpha, epsilon):
        ops = gram.ops
        self.ops, self.gram, self.alpha = ops, gram, alpha
        self.power = gram.const(-1.0 / alpha)
        self.corr = gram.ridged_correlation(epsilon)  # identity rows for inactive tasks
        # Inactive tasks: c = 1, so b = 1 there (dropped at the end).
        self.coeff = ops.where(gram.active, ops.power(gram.norms(), gram.const(1.0 / alpha - 1.0)), 1.0)

    def value(self, b):  # (..., T) -> (...)
        ops = self.ops
        quadratic = 0.5 * nx.dot(b, nx.matvec(self.corr, b, ops=ops), ops=ops)
        if self.alpha == 1.0:
            utility = ops.log(b)
        else:
            exponent = 1.0 - 1.0 / self.alpha
            utility = ops.power(b, self.gram.const(exponent)) / exponent
        return quadratic - ops.sum(self.coeff * utility, axis=-1)

    def newton(self, b):
        """The Newton direction and the squared Newton decrement."""
        ops = self.ops
        barrier = self.coeff * ops.power(b, self.power)
        grad = nx.matvec(self.corr, b, ops=ops) - barrier
        hessian = self.corr + nx.diagonal_matrix(barrier / (self.alpha * b), ops=ops)
        direction = -ops.solve(hessian, grad)
        return direction, -ops.sum(grad * direction)

    def start(self):
        """The best point on the ray through 1: s^(1 + 1/alpha) = sum(c) / 1^T C 1."""
        ops, gram = self.ops, self.gram
        total = nx.maximum(ops.sum(self.corr), gram.const(gram.eps), ops=ops)
        s = ops.power(ops.sum(self.coeff) / total, gram.const(self.alpha / (self.alpha + 1.0)))
        return s * ops.ones((gram.num_tasks,), dtype=gram.dtype)


def fair_weights(gram, alpha, max_iters=50, epsilon=1e-6, cap=None):
    """w > 0 with (M w)_i = w_i^(-1/alpha), for a `GramInput`, by damped
    Newton on `_Objective`; 0 for tasks whose gradient is zero; the
    unit-scale weights b scaled down together to at most `cap` (None: no
    cap)."""
    ops = gram.ops
    objective = _Objective(gram, alpha, epsilon)
    steps = ops.power(gram.const(0.5), ops.arange(LINE_SEARCH_STEPS, dtype=gram.dtype))
    abs_corr = ops.abs(objective.corr)

    def cond(b, decrement, previous):
        # Converged, or rounding noise stalls the quadratic convergence.
        barrier = objective.coeff * ops.power(b, objective.power) * b
        noise = gram.eps * ops.sum(nx.matvec(abs_corr, b, ops=ops) * b + barrier)
        stalled = (previous < 1e-4) & (decrement > 0.25 * previous)
        return (decrement > gram.eps * noise) & ~stalled

    def body(b, last_decrement, previous):
        direction, decrement = objective.newton(b)
        # Longest step keeping b > 0, then halvings of min(1, 0.99 of it).
        shrinking = direction < 0
        ratio = ops.where(shrinking, b / ops.where(shrinking, -direction, 1.0), np.inf)
        longest = nx.minimum(0.99 * ops.min(ratio), gram.const(1.0), ops=ops)
        candidates = b[None, :] + (longest * steps)[:, None] * direction[None, :]
        values = objective.value(candidates)
        values = ops.where(ops.isfinite(values), values, np.inf)
        searched = ops.take(candidates, nx.argmin(values, ops=ops), axis=0)
        full = b + direction
        take_full = (decrement < FULL_STEP_DECREMENT) & ops.all(full > 0)
        moved = ops.where(take_full, full, searched)
        moved = ops.where(ops.all(ops.isfinite(moved)), moved, b)
        return moved, decrement, last_decrement

    inf = gram.const(np.inf)
    b, _, _ = ops.while_loop(cond, body, (objective.start(), inf, inf), maximum_iterations=max_iters)
    # b over its value for orthogonal gradients, c^(alpha / (alpha + 1)): 1 there.
    relative = ops.where(gram.active, b / ops.power(objective.coeff, gram.const(alpha / (alpha + 1.0))), 0.0)
    b = b * cap_factor(relative, cap, ops=ops)
    # w = b / ||g||, in units of the unit-scaled M; M = scale * unit.
    weights = b / gram.norms() * ops.power(gram.scale, gram.const(-alpha / (alpha + 1.0)))
    return ops.where(gram.active, weights, 0.0)
