"""IMTL-G (Liu et al., ICLR 2021): the gradient half of impartial
multi-task learning, in closed form on the Gram matrix."""

import keras

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput

__all__ = ["IMTLG", "impartial_weights"]

# Relative ridge of the linear solve (which TF and torch reject when it is
# exactly singular, e.g. for identical gradients), removed again by a few
# steps of iterative refinement against the exact system.
RIDGE = 1e-5
REFINEMENTS = 3


@keras.saving.register_keras_serializable(package="keras_mgda")
class IMTLG(GradientWeighting):
    """Impartial multi-task learning, gradient balance (IMTL-G).

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021. Finds the weights alpha, summing to 1,
    whose aggregated gradient g = sum_t alpha_t g_t has equal projections
    onto every unit task gradient u_t = g_t / ||g_t||: g . u_t is the same
    for all t. The paper's closed form, alpha_{2:T} = g_1 U^T (D U^T)^{-1}
    with D and U the differences g_1 - g_t and u_1 - u_t, is the solution of
    the same linear system; here it is solved from the Gram matrix as

        C beta = c 1,   sum_t beta_t / ||g_t|| = 1,   alpha_t = beta_t / ||g_t||,

    with C the Gram matrix of the unit gradients (one (T + 1) x (T + 1)
    solve with a small ridge, refined away). The closed form does not
    exclude a negative common projection c, where g would increase every
    loss (we measured it for 1 in 20 random problems with T = 10 and
    gradient norms spread over 8 orders of magnitude); then -g is used,
    with weights summing to -1, so that every task loss decreases at the
    same rate to first order: M alpha >= 0 always. Tasks whose gradient is
    exactly zero get weight 0 and are left out; if every gradient is zero,
    or the system has no finite solution, the weights are uniform.

    Task heads keep their plain gradients (`head_update="full"`), as in the
    paper's Algorithm 1, where task-specific parameters follow their own
    (IMTL-L-scaled) losses. IMTL-L's learned loss scales are a separate,
    loss-based method.

    Args:
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap, the paper's suggestion for speed) or
            `"parameters"` (with respect to the shared weights).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights alpha, summing to 1 (to -1 in the
        case above; single weights may be negative). Invariant to scaling M.

    Example:

    ```python
    weighting = keras_mgda.weighting.IMTLG()
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        return gram.finish(impartial_weights(gram))


def impartial_weights(gram):
    """IMTL-G's alpha for a `GramInput`."""
    ops = gram.ops
    num_tasks = gram.num_tasks
    dtype = gram.dtype
    active = gram.active
    active_f = ops.cast(active, dtype)
    norms = gram.norms()
    corr = gram.correlation()  # identity rows and columns for inactive tasks
    smallest = ops.min(ops.where(active, norms, 1.0))
    # Unknowns (beta, c). Rows of active t: (C beta)_t - c = 0; inactive t:
    # beta_t = 0. Last row: sum_t (smallest / |g_t|) beta_t = smallest, i.e.
    # sum_t alpha_t = 1 with entries <= 1.
    border = active_f * smallest / norms
    # (With no active task the corner is 1, so the system stays regular.)
    corner = ops.where(ops.any(active), 0.0, 1.0)
    column = ops.concatenate([-active_f, ops.reshape(ops.cast(corner, dtype), (1,))])[:, None]
    top = corr
    rows = ops.concatenate([top, border[None, :]], axis=0)
    exact = ops.concatenate([rows, column], axis=1)
    # Ridge on the beta block only (relative: C has a unit diagonal).
    ridge = ops.concatenate([active_f * RIDGE, ops.zeros((1,), dtype=dtype)])
    ridged = exact + nx.diagonal_matrix(ridge, ops=ops)
    rhs = ops.concatenate([ops.zeros((num_tasks,), dtype=dtype), ops.reshape(smallest, (1,))])
    solution = ops.solve(ridged, rhs)
    for _ in range(REFINEMENTS):
        # matvec, not ops.matmul: Keras's torch matmul computes float64 in float32.
        residual = rhs - nx.matvec(exact, solution, ops=ops)
        solution = solution + ops.solve(ridged, residual)
    alpha = active_f * solution[:num_tasks] / norms
    # The common projection c = g . u_t can come out negative (rarely; the
    # closed form does not exclude it): then -g, with equal positive
    # projections, is the impartial descent direction.
    alpha = ops.where(solution[num_tasks] < 0, -alpha, alpha)
    uniform = ops.full((num_tasks,), 1.0 / num_tasks, dtype=dtype)
    ok = ops.any(active) & ops.all(ops.isfinite(alpha))
    return ops.where(ok, alpha, uniform)
