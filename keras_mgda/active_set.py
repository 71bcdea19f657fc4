"""One exact active-set method for the small quadratic programs of the
weightings:

    minimise  w^T M w   subject to   w >= l   (and sum(w) = 1: `simplex`)

for a positive semi-definite Gram matrix M. UPGrad's projections onto the
dual cone are the bound case with l = e_i. The simplex case with l = 0 is
MGDA's min-norm point, which `solvers.min_norm` solves with the faster
method of `keras_mgda.primal_dual`, in the same scaled variables.

Each round solves the KKT system on the free set F (tasks above their
bound) exactly, with a vanishing proximal term delta * |y - y_prev|^2 that
keeps it regular for identical, collinear or rank-deficient gradients (and
vanishes at convergence, so the limit is the exact optimum); extends the
step by exact line search (the proximal step undershoots along weakly
curved directions); cuts it where the first free weight reaches its bound,
which leaves F; and then frees every bound task whose KKT condition is
violated beyond rounding noise. It stops when the proximal pull is below
rounding noise, so the KKT conditions hold to working precision.

Everything runs in the variables y = s * w with s_j = |g_j|, where the
matrix C = M / (s s^T) has a unit diagonal: the proximal term is then
relative to each task's own scale, so tiny gradients beside huge ones are
still resolved.

Written with fixed shapes and a capped loop (`ops.while_loop`), batched
over leading axes, so it runs under `tf.function`, XLA and `jax.jit`.
"""

import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.types import Ops
from keras_mgda.types import Tensor

__all__ = ["JOIN_NOISE", "ScaledProblem", "active_set_qp"]

# A task joins the free set when its KKT condition is violated by more than
# JOIN_NOISE times the rounding noise of its gradient entry; lower values
# chase noise on inexact Gram matrices.
JOIN_NOISE = 16.0


class ScaledProblem:
    """The scaled problem: C, |C|, the bounds and the sum constraint in y
    (`keras_mgda.primal_dual` solves MGDA's simplex case on it too)."""

    def __init__(self, gram, lower, mask, simplex, ops):
        self.ops = ops
        self.simplex = simplex
        self.dtype = nx.float_dtype(gram)
        self.eps = nx.eps(self.dtype)
        self.delta = float(np.sqrt(self.eps))
        self.num_tasks = gram.shape[-1]
        diag = ops.diagonal(gram, axis1=-2, axis2=-1)
        # Floored at eps^2 (M is scaled to max M_ii ~ 1): a zero gradient
        # gets a zero row of C and stays solvable through delta.
        floor = nx.const(self.eps * self.eps, gram, ops=ops)
        self.scale = ops.sqrt(nx.maximum(diag, floor, ops=ops))
        self.unit = gram / self.scale[..., :, None] / self.scale[..., None, :]
        self.abs_unit = ops.abs(self.unit)
        self.inverse = 1.0 / self.scale  # sum(w) = inverse . y
        self.bound = lower * self.scale
        self.mask = mask

    def products(self, y):
        """C y, the reduced gradient (minus the sum constraint's multiplier
        y^T C y on the simplex) and the rounding noise of its entries."""
        ops = self.ops
        grad = nx.matvec(self.unit, y, ops=ops)
        abs_grad = nx.matvec(self.abs_unit, ops.abs(y), ops=ops)
        noise = self.eps * abs_grad
        reduced = grad
        if self.simplex:
            value = nx.dot(y, grad, ops=ops)[..., None]
            reduced = grad - value * self.inverse
            noise = noise + self.eps * nx.dot(ops.abs(y), abs_grad, ops=ops)[..., None] * self.inverse
        return grad, reduced, noise

    def proximal_target(self, y, free):
        """argmin y^T C y + delta |y - y_prev|^2 on the free set, the other
        tasks at their bound (identity rows), and sum(w) = 1 on the simplex
        (bordered: the solution stays O(1) even where C_FF is singular)."""
        ops, num_tasks = self.ops, self.num_tasks
        free_f = ops.cast(free, self.dtype)
        eye = ops.eye(num_tasks, dtype=self.dtype)
        system = self.unit * free_f[..., :, None] * free_f[..., None, :]
        system = system + eye * ops.where(free, nx.const(self.delta, y, ops=ops), 1.0)[..., None]
        fixed = y * (1.0 - free_f)
        rhs = ops.where(free, self.delta * y - nx.matvec(self.unit, fixed, ops=ops), y)
        if self.simplex:
            border = free_f * self.inverse
            border_scale = 1.0 / ops.max(border, axis=-1, keepdims=True)
            border = border * border_scale
            system = ops.concatenate([system, border[..., :, None]], axis=-1)
            corner = ops.concatenate([border, ops.zeros_like(border[..., :1])], axis=-1)
            system = ops.concatenate([system, corner[..., None, :]], axis=-2)
            remaining = 1.0 - nx.dot(self.inverse, fixed, ops=ops)[..., None]
            rhs = ops.concatenate([rhs, border_scale * remaining], axis=-1)
        return ops.solve(system, rhs[..., None])[..., :num_tasks, 0]

    def step_length(self, grad, direction, settled):
        """The exact line minimum along the step (>= 1 in exact arithmetic).

        Where the curvature is lost in rounding the objective is flat: on
        the simplex go to the boundary (bounded, and it drops a task); with
        bounds only stay at the proximal step, since the boundary may lie
        arbitrarily far along a null direction of M.
        """
        ops, eps = self.ops, self.eps
        slope = nx.dot(grad, direction, ops=ops)
        curvature = nx.dot(nx.matvec(self.unit, direction, ops=ops), direction, ops=ops)
        curved = curvature > 16.0 * eps * ops.square(ops.sum(ops.abs(direction), axis=-1))
        flat_length = 1.0 / eps if self.simplex else 1.0
        line_minimum = -slope / ops.where(curved, curvature, 1.0)
        length = ops.where(
            curved, nx.maximum(line_minimum, nx.const(1.0, grad, ops=ops), ops=ops), flat_length
        )
        descent = (slope < 0) & ~settled
        return ops.where(descent, length, 1.0)[..., None]

    def move(self, y, direction, length, free):
        """The step cut at the first free weight that reaches its bound
        (ratio test); returns the new point and which tasks were blocked."""
        ops = self.ops
        shrinking = free & (direction < 0)
        safe = ops.where(shrinking, -direction, 1.0)
        ratio = ops.where(shrinking, (y - self.bound) / safe, np.inf)
        step = nx.minimum(ops.min(ratio, axis=-1, keepdims=True), length, ops=ops)
        blocked = shrinking & (ratio <= step)
        moved = y + step * direction
        moved = ops.where(blocked | (moved < self.bound), self.bound, moved)
        if self.simplex:  # back onto sum(w) = 1 against drift
            moved = moved / nx.dot(self.inverse, moved, ops=ops)[..., None]
        return moved, blocked


def _round(problem, state):
    """One round of the active-set method on every unfinished problem."""
    ops = problem.ops
    y, grad, noise, free, done = state
    direction = ops.where(free, problem.proximal_target(y, free) - y, 0.0)
    # Settled: the proximal pull is below rounding noise, so the KKT
    # conditions hold on the free set to working precision.
    settled = ops.all(problem.delta * ops.abs(direction) <= noise, axis=-1)
    length = problem.step_length(grad, direction, settled)
    moved, blocked = problem.move(y, direction, length, free)
    at_line_minimum = ~ops.any(blocked, axis=-1)
    # A failed solve (underflow, non-PSD input) ends the method there.
    failed = ~ops.all(ops.isfinite(moved), axis=-1)
    moved = ops.where(failed[..., None], y, moved)

    # KKT check at the new point: no bound task may be pulled inwards
    # beyond rounding noise.
    grad_moved, reduced, noise_moved = problem.products(moved)
    kept = free & ~blocked
    below = problem.mask & ~kept & (reduced + JOIN_NOISE * noise_moved < 0)
    joining = below & at_line_minimum[..., None]
    now_done = (settled & at_line_minimum & ~ops.any(joining, axis=-1)) | failed

    def update(new, old):
        return ops.where(done[..., None], old, new)

    return (
        update(moved, y),
        update(grad_moved, grad),
        update(noise_moved, noise),
        update(kept | joining, free),
        done | now_done,
    )


def active_set_qp(
    gram: Tensor,
    lower: Tensor,
    start: Tensor,
    free: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    simplex: bool,
    max_rounds: int,
    ops: Ops,
) -> Tensor:
    """Solves min w^T M w over {w >= lower} (and sum(w) = 1 if `simplex`).

    Args:
        gram: (..., T, T) positive semi-definite matrix, max diagonal ~ 1
            (scale it by a power of two first: the tolerances are relative).
        lower: (..., T) lower bounds (zeros on the simplex).
        start: (..., T) a feasible starting point.
        free: bool (..., T), the tasks free at the start; default: those
            above their bound and those whose KKT condition the start
            violates.
        mask: optional bool (..., T); tasks with mask False stay at their
            bound. Default: every task may move.
        simplex: whether sum(w) = 1 is imposed.
        max_rounds: cap on the rounds (2 T + 16 is plenty in practice).
        ops: the array namespace (`keras.ops` or a fast path of it).

    Returns:
        (..., T) the minimiser, in the dtype of `gram`.

    Example:

    ```python
    eye = keras.ops.eye(3)
    # UPGrad's projections: w_i = argmin_{w >= e_i} w^T M w, for every i.
    w = active_set_qp(gram, eye, eye, simplex=False, max_rounds=22, ops=keras.ops)
    ```
    """
    if mask is None:
        mask = ops.ones_like(start, dtype="bool")
    problem = ScaledProblem(gram, lower, mask, simplex, ops)
    y = start * problem.scale
    grad, reduced, noise = problem.products(y)
    if free is None:
        pulled_in = mask & (reduced + JOIN_NOISE * noise < 0)
        free = (start > lower) | pulled_in
    done = ~ops.any(free, axis=-1)
    state = (y, grad, noise, free, done)
    y, _, _, _, _ = ops.while_loop(
        lambda *state: ~ops.all(state[-1]),
        lambda *state: _round(problem, state),
        state,
        maximum_iterations=max_rounds,
    )
    return y / problem.scale
