"""The exact solve of MGDA's min-norm problem,

    minimise  w^T M w   subject to   w >= 0,  sum(w) = 1,

by a primal-dual active-set method (Hintermüller, Ito and Kunisch, SIAM J.
Optim. 2002) that turns into a primal one if it has not ended early.

Each round solves the KKT system on the free set F exactly (one linear
solve with two right-hand sides). For the first `T // 4 + 6` rounds the
method then jumps: every free task whose weight came out <= 0 is bound to
0 and every bound task whose multiplier is negative beyond rounding noise
is freed, all at once, and the next round starts from the solution (its
negative weights set to 0). Jumps find the optimal free set in a few
rounds, but they can cycle where M is singular. Later rounds are primal:
the step towards the solution is cut where the first free weight reaches
0, which leaves F, and tasks join only when the step was not cut, so the
objective never rises. A task that left without the point moving may not
join again until the point moves: where M is singular and badly scaled,
rounding can say both that it should join and that its weight is <= 0.

The method ends at the second round in a row in which no task changes
side: that second solve, centred on the first, refines it.

The solve carries a proximal term delta |y - y_prev|^2, delta = 16 eps, in
the scaled variables y = s * w (s_j = |g_j|, as in `keras_mgda.active_set`,
so that the matrix C = M / (s s^T) has a unit diagonal). It keeps the
system regular for identical, collinear or rank-deficient gradients.

Written with fixed shapes and a capped loop (`ops.while_loop`), batched
over leading axes, so it runs under `tf.function`, XLA and `jax.jit`.
"""

import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.active_set import JOIN_NOISE
from keras_mgda.active_set import ScaledProblem
from keras_mgda.types import Ops
from keras_mgda.types import Tensor

__all__ = ["primal_dual_min_norm"]

# The proximal term, in units of eps: large enough that C_FF + delta I is
# regular in rounding, small enough that one refining solve makes it exact.
DELTA_IN_EPS = 16.0


def _free_solution(problem, center, free):
    """argmin y^T C y + delta |y - center|^2 with y = 0 off the free set
    and sum(w) = 1: (C_FF + delta I) y = delta center + lambda s^-1, solved
    for both right-hand sides at once."""
    ops, dtype = problem.ops, problem.dtype
    delta = DELTA_IN_EPS * problem.eps
    free_f = ops.cast(free, dtype)
    eye = ops.eye(free.shape[-1], dtype=dtype)
    system = problem.unit * free_f[..., :, None] * free_f[..., None, :]
    typed_delta = nx.const(delta, problem.unit, ops=ops)  # both branches scalars: no dtype
    system = system + eye * ops.where(free, typed_delta, 1.0)[..., None]
    rhs = ops.concatenate([(delta * free_f * center)[..., None], (free_f * problem.inverse)[..., None]], axis=-1)
    parts = ops.solve(system, rhs)
    pulled, summing = parts[..., 0], parts[..., 1]
    sums = ops.sum(problem.inverse[..., None] * parts, axis=-2)  # sum(w) of each part
    return free_f * (pulled + (1.0 - sums[..., :1]) / sums[..., 1:] * summing)


def _step(problem, y, solution, free, jumping):
    """The next point, the tasks that leave, whether the step was cut, and
    whether the point moved: a jump to the solution, or the primal step
    towards it cut where the first free weight reaches 0."""
    ops = problem.ops
    direction = solution - y
    shrinking = free & (direction < 0)
    ratio = ops.where(shrinking, y / ops.where(shrinking, -direction, 1.0), np.inf)
    length = nx.minimum(ops.min(ratio, axis=-1, keepdims=True), nx.const(1.0, y, ops=ops), ops=ops)
    blocked = shrinking & (ratio <= length) & ~jumping
    cut = ops.where(blocked, 0.0, y + length * direction)
    moved = nx.maximum(ops.where(jumping, solution, cut), nx.const(0.0, y, ops=ops), ops=ops)
    moved = moved / ops.sum(problem.inverse * moved, axis=-1, keepdims=True)  # onto sum(w) = 1
    leaving = blocked | (jumping & free & ~(solution > 0))
    shifted = ops.any(ops.abs(moved - y) > 4.0 * problem.eps * ops.abs(y), axis=-1, keepdims=True)
    return moved, leaving, ops.any(blocked, axis=-1, keepdims=True), shifted


def _round(problem, jumps, state):
    """One round on every unfinished problem."""
    ops = problem.ops
    y, free, done, rounds, held, barred = state
    jumping = (rounds < jumps)[..., None]
    solution = _free_solution(problem, y, free)
    moved, leaving, cut, shifted = _step(problem, y, solution, free, jumping)
    _, reduced, noise = problem.products(moved)  # multipliers, rounding noise
    joining = problem.mask & ~free & ~barred & ~cut & (reduced + JOIN_NOISE * noise < 0)
    holds = ~ops.any(leaving | joining, axis=-1)
    # Left without the point moving: barred from joining until it moves.
    barred = (barred | leaving) & ~shifted & ~jumping
    failed = ~ops.all(ops.isfinite(moved), axis=-1)  # non-PSD input, underflow
    stop = (done | failed)[..., None]
    return (
        ops.where(stop, y, moved),
        ops.where(stop, free, free != (leaving | joining)),
        done | (holds & held) | failed,
        rounds + 1.0,
        holds,
        barred,
    )


def primal_dual_min_norm(gram: Tensor, start: Tensor, mask: Tensor, *, ops: Ops) -> Tensor:
    """Solves min w^T M w over the probability simplex, from `start`.

    Args:
        gram: (..., T, T) positive semi-definite matrix, max diagonal ~ 1
            (scale it by a power of two first: the tolerances are relative).
        start: (..., T) a point of the simplex; its support is the first
            free set (`solvers.min_norm` passes the best pair).
        mask: bool (..., T); tasks with mask False stay at 0.
        ops: the array namespace (`keras.ops` or a fast path of it).

    Returns:
        (..., T) the minimiser, >= 0 and summing to 1 to rounding.

    Example:

    ```python
    w = primal_dual_min_norm(gram, start, keras.ops.ones((3,), "bool"), ops=keras.ops)
    ```
    """
    num_tasks = gram.shape[-1]
    problem = ScaledProblem(gram, ops.zeros_like(start), mask, True, ops)
    free = start > 0
    done = ~ops.any(free, axis=-1)
    rounds = ops.zeros_like(start[..., 0])
    state = (start * problem.scale, free, done, rounds, done, free & ~free)
    y = ops.while_loop(
        lambda *state: ~ops.all(state[2]),
        lambda *state: _round(problem, float(num_tasks // 4 + 6), state),
        state,
        maximum_iterations=2 * num_tasks + 16,
    )[0]
    return y / problem.scale
