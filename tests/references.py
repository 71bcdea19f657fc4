"""Independent references for the Gram-matrix weightings, used only by the
tests (tests/weighting/): each computes what a method's paper defines, by
another route than the library's.

* `bound_qp` — the exact minimiser of w^T M w over {w >= u} (UPGrad's
  projections onto the dual cone, Quinton & Rey 2024, Proposition 1):
  candidate free sets are enumerated in float64 and the best one is solved
  and CERTIFIED in mpmath at 50 digits (its KKT conditions hold exactly,
  which for a convex QP proves optimality). M is taken as exact: pass Gram
  matrices that are exactly what the method sees.
* `cagrad_primal` — CAGrad's primal problem max_d min_i g_i . d subject to
  |d - g0| <= c |g0|, solved by cvxpy with Clarabel (a conic solver).
* `imtl_weights` — IMTL-G's equations (equal projections of the update on
  the unit gradients, weights summing to 1, or to -1 where the common
  projection is negative), solved with numpy.linalg in float64.
* `aligned_weights` — Aligned-MTL's balance transformation from
  numpy.linalg.eigh in float64.
* `pcgrad_surgery` — PCGrad's Algorithm 1 on explicit vectors.

mpmath and cvxpy (with clarabel) are test dependencies; each function
imports what it needs, so a module that uses only numpy references does
not need them.
"""

import functools
import itertools

import numpy as np

__all__ = [
    "aligned_weights",
    "bound_qp",
    "cagrad_primal",
    "imtl_weights",
    "pcgrad_surgery",
]

DIGITS = 50


# ------------------------------------------------------------ bound QP


def _candidates(gram, lower, max_free, slack=1e-6):
    """Free sets F (|F| <= max_free) whose equality-constrained minimiser is
    feasible and satisfies the KKT conditions to `slack` (float64, in the
    variables y = |g| w, where the matrix has a unit diagonal), best first:
    [(value, F)]."""
    num_tasks = len(gram)
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-300))
    corr = gram / norms[:, None] / norms[None, :]
    abs_corr = np.abs(corr)
    bound = lower * norms
    base_grad = corr @ bound
    found = []
    for size in range(0, max_free + 1):
        for free in itertools.combinations(range(num_tasks), size):
            free = list(free)
            y = bound.copy()
            if free:
                try:
                    step = np.linalg.solve(corr[np.ix_(free, free)], -base_grad[free])
                except np.linalg.LinAlgError:
                    continue
                if not np.all(np.isfinite(step)):
                    continue
                y[free] += step
            grad = corr @ y
            noise = slack * (abs_corr @ np.abs(y)) + 1e-300
            if np.any(y - bound < -slack * np.abs(y).max()) or np.any(grad < -noise):
                continue
            found.append((float(y @ grad), free))
    found.sort(key=lambda item: item[0])
    return found


def _certify(gram_mp, lower, free):
    """Solves the KKT system of free set `free` in mpmath and checks every
    KKT condition exactly (to 1e-40 of the entries' scale). Returns
    (value, w) as mpmath numbers, or None."""
    import mpmath

    num_tasks = gram_mp.rows
    w = [mpmath.mpf(float(x)) for x in lower]
    if free:
        system = mpmath.matrix(len(free), len(free))
        rhs = mpmath.matrix(len(free), 1)
        for a, i in enumerate(free):
            rhs[a] = -mpmath.fsum(gram_mp[i, k] * w[k] for k in range(num_tasks))
            for b, j in enumerate(free):
                system[a, b] = gram_mp[i, j]
        try:
            step = mpmath.lu_solve(system, rhs)
        except ZeroDivisionError:
            return None
        for a, i in enumerate(free):
            if step[a] < 0:
                return None
            w[i] += step[a]
    tiny = mpmath.mpf(10) ** (10 - DIGITS)
    scale = max(abs(x) for x in w)
    grad = []
    for i in range(num_tasks):
        grad.append(mpmath.fsum(gram_mp[i, k] * w[k] for k in range(num_tasks)))
        noise = tiny * mpmath.fsum(abs(gram_mp[i, k]) * scale for k in range(num_tasks))
        if grad[i] < -noise or (i in free and abs(grad[i]) > noise):
            return None
    value = mpmath.fsum(w[i] * grad[i] for i in range(num_tasks))
    return value, w


@functools.lru_cache(maxsize=512)
def _bound_qp_cached(gram_bytes, lower_bytes, num_tasks, max_free):
    import mpmath

    gram = np.frombuffer(gram_bytes).reshape(num_tasks, num_tasks)
    lower = np.frombuffer(lower_bytes)
    with mpmath.workdps(DIGITS):
        gram_mp = mpmath.matrix([[mpmath.mpf(float(x)) for x in row] for row in gram])
        for _, free in _candidates(gram, lower, max_free):
            certified = _certify(gram_mp, lower, free)
            if certified is not None:
                value, w = certified
                return float(value), np.array([float(x) for x in w]), tuple(free)
    raise AssertionError("no certified solution: is M positive semi-definite, max_free >= rank?")


def bound_qp(gram, lower, max_free=None):
    """Exact solution of  minimise w^T M w  subject to  w >= lower.

    Some minimiser has a free set F (tasks above their bound) whose rows of
    M are independent, so |F| <= rank(M) (Caratheodory); the candidate free
    sets are enumerated in float64 and the best candidate whose KKT
    conditions (w_F from M_FF w_F = -(M u)_F, w_F >= u_F, (M w)_j >= 0 off
    F) hold exactly in 50-digit arithmetic is returned. Cached.

    Args:
        gram: (T, T) float64 positive semi-definite matrix, taken as exact.
        lower: (T,) lower bounds u (>= 0).
        max_free: the largest free set tried (default: the numerical rank
            of M, at most T).

    Returns:
        (value, w, free): the optimal value w^T M w (float, rounded once
        from 50 digits), a minimiser (float64, exact to 50 digits before
        rounding; THE minimiser when M is nonsingular) and its free set.
    """
    gram = np.ascontiguousarray(gram, dtype=np.float64)
    lower = np.ascontiguousarray(lower, dtype=np.float64)
    if max_free is None:
        max_free = int(np.linalg.matrix_rank(gram))
    return _bound_qp_cached(gram.tobytes(), lower.tobytes(), len(gram), int(max_free))


# ------------------------------------------------------------- CAGrad


@functools.lru_cache(maxsize=256)
def _cagrad_cached(g_bytes, shape, c):
    import cvxpy as cp

    g = np.frombuffer(g_bytes).reshape(shape)
    # Solved at a unit scale (the problem is homogeneous: scaling G by s
    # scales d by s and the value by s^2).
    scale = np.linalg.norm(g, axis=1).max()
    g = g / scale
    g0 = g.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    d = cp.Variable(shape[1])
    t = cp.Variable()
    problem = cp.Problem(cp.Maximize(t), [g @ d >= t, cp.norm(d - g0, 2) <= radius])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise AssertionError(f"cvxpy: {problem.status}")
    d = np.asarray(d.value, np.float64)
    return float(np.min(g @ d)) * scale * scale, d * scale


def cagrad_primal(g, c):
    """CAGrad's primal problem (Liu et al. 2021, Eq. 3), solved by Clarabel.

        maximise_d  min_i g_i . d   subject to   |d - g0| <= c |g0|,

    with g0 the mean gradient. Cached.

    Args:
        g: (T, D) task gradients, float64.
        c: the radius relative to |g0|.

    Returns:
        (value, d): the optimal worst improvement min_i g_i . d (evaluated
        on Clarabel's d) and d.
    """
    g = np.ascontiguousarray(g, dtype=np.float64)
    return _cagrad_cached(g.tobytes(), g.shape, float(c))


# --------------------------------------------------------------- IMTL-G


def imtl_weights(gram):
    """IMTL-G's weights from its equations (Liu et al. 2021), in float64.

    With n_t = |g_t|, equal projections g . u_t = c of the update
    g = sum_t alpha_t g_t on the unit gradients read M alpha = c n, so
    alpha = c M^-1 n; sum(alpha) = 1 fixes c = 1 / sum(M^-1 n). Where that
    c is negative, every loss would increase: -alpha is taken instead
    (weights summing to -1, see `keras_mgda.weighting.IMTLG`). Both cases:
    alpha = M^-1 n / |sum(M^-1 n)|.

    Args:
        gram: (T, T) nonsingular Gram matrix.

    Returns:
        (T,) float64 weights.
    """
    gram = np.asarray(gram, np.float64)
    norms = np.sqrt(np.diag(gram))
    # Solved on the correlation matrix (unit diagonal) for accuracy.
    corr = gram / norms[:, None] / norms[None, :]
    beta = np.linalg.solve(corr, np.ones(len(gram)))
    beta = beta + np.linalg.solve(corr, np.ones(len(gram)) - corr @ beta)
    alpha = beta / norms
    return alpha / abs(alpha.sum())


# ---------------------------------------------------------- Aligned-MTL


def aligned_weights(gram, scale_mode="min", rank=None, eps=None):
    """Aligned-MTL's weights B 1 (Senushkin et al. 2023, Algorithm 1).

    M = V diag(lambda) V^T (numpy.linalg.eigh, float64), restricted to the
    R largest eigenvalues, and B = sqrt(s) V_R diag(lambda_R^-1/2) V_R^T with
    s the smallest (`"min"`), the lower median (`"median"`) or the mean
    (`"rmse"`) of the kept eigenvalues.

    Args:
        gram: (T, T) positive semi-definite Gram matrix.
        scale_mode: `"min"`, `"median"` or `"rmse"`.
        rank: R; default: the eigenvalues above max(lambda) T eps are kept.
        eps: the epsilon of that rule (default float32's, as the model's
            Gram matrices are float32).

    Returns:
        (weights, balance, kept eigenvalues, s).
    """
    gram = np.asarray(gram, np.float64)
    values, vectors = np.linalg.eigh(gram)
    if rank is None:
        eps = np.finfo(np.float32).eps if eps is None else eps
        rank = int(np.sum(values > values.max() * len(gram) * eps))
    values, vectors = values[len(gram) - rank :], vectors[:, len(gram) - rank :]
    scale = {
        "min": values.min(),
        "median": np.sort(values)[(len(values) - 1) // 2],
        "rmse": values.mean(),
    }[scale_mode]
    balance = np.sqrt(scale) * (vectors / np.sqrt(values)) @ vectors.T
    return balance.sum(1), balance, values, scale


# --------------------------------------------------------------- PCGrad


def pcgrad_surgery(g, order):
    """PCGrad on explicit vectors (the paper's Algorithm 1, one order shared
    by every task): sum_i g_i^PC.

    Args:
        g: (T, D) task gradients.
        order: the order in which each g_i^PC is projected.

    Returns:
        (D,) the sum of the projected gradients.
    """
    projected = np.array(g, dtype=np.float64)
    for i in range(len(g)):
        for j in order:
            if j == i:
                continue
            dot = projected[i] @ g[j]
            if dot < 0:
                projected[i] -= dot / (g[j] @ g[j]) * g[j]
    return projected.sum(axis=0)
