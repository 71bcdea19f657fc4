"""Exact reference solvers for the min-norm QP, in numpy float64.

    minimise  a^T M a   subject to   a >= 0,  sum(a) = 1

for a symmetric positive semi-definite Gram matrix M = G G^T. Used only by
the tests, to measure how far `keras_mgda.solvers.min_norm` is from the true
optimum. Plain numpy, no scipy.

* `exact_min_norm` is Wolfe's minimum-norm-point algorithm (Wolfe, 1976)
  written on the Gram matrix: it keeps an affinely independent "corral" of
  vertices, solves the KKT system of the affine hull exactly (with one step
  of iterative refinement), and adds the most violating vertex until no
  vertex is below the current point. Any T.
* `brute_force_min_norm` enumerates every support set and keeps the best
  feasible affine minimiser. Exponential in T: for T <= 10 only, to
  cross-check `exact_min_norm`.
* `objective` evaluates a^T M a exactly (error-free products and a correctly
  rounded sum), so that objective gaps far below float64 rounding of the
  naive sum can be measured.
"""

import itertools
import math

import numpy as np


def _power_of_two_scale(gram):
    """Exponent e with max diag(gram) ~ 2**e (scaling by 2**-e is exact)."""
    largest = float(np.max(np.diag(gram)))
    if not largest > 0.0:
        return 0
    return math.frexp(largest)[1]


def _affine_minimiser(gram, support):
    """Minimiser of a^T M a over {a : sum(a) = 1, a_i = 0 off `support`}.

    Solves the bordered KKT system [[M_SS, 1], [1^T, 0]] [w; -lam] = [0; 1]
    and refines once against the residual. Returns (w, ok).
    """
    k = len(support)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = gram[np.ix_(support, support)]
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    try:
        z = np.linalg.solve(kkt, rhs)
        z = z + np.linalg.solve(kkt, rhs - kkt @ z)
    except np.linalg.LinAlgError:
        return None, False
    w = z[:k]
    return w, bool(np.all(np.isfinite(w)))


def exact_min_norm(gram, max_iters=None):
    """Exact minimiser of a^T M a over the probability simplex.

    Args:
        gram: (T, T) symmetric positive semi-definite Gram matrix.
        max_iters: cap on Wolfe major iterations (default 50 * T + 50).

    Returns:
        (T,) float64 weights on the simplex.
    """
    gram = np.asarray(gram, dtype=np.float64)
    num_tasks = gram.shape[0]
    if gram.shape != (num_tasks, num_tasks):
        raise ValueError(f"gram must be square, got shape {gram.shape}")
    if num_tasks == 1:
        return np.ones(1)
    if not np.max(np.diag(gram)) > 0.0:
        return np.full(num_tasks, 1.0 / num_tasks)
    # Exact power-of-two rescale: max diag in [0.5, 1), |M_ij| <= 1.
    gram = np.ldexp(gram, -_power_of_two_scale(gram))
    eps = np.finfo(np.float64).eps
    abs_gram = np.abs(gram)
    zero_tol = 1e-15  # weights this small leave the corral
    max_iters = 50 * num_tasks + 50 if max_iters is None else max_iters

    first = int(np.argmin(np.diag(gram)))
    corral = [first]
    weights = np.zeros(num_tasks)
    weights[first] = 1.0
    value = gram[first, first]
    for _ in range(max_iters):
        gram_weights = gram @ weights
        candidate = int(np.argmin(gram_weights))
        # The vertex must be below the current point by more than the
        # rounding noise of both sides (relative, so that tiny gradients
        # next to huge ones are still resolved).
        noise = 8 * eps * (abs_gram[candidate] @ weights + weights @ abs_gram @ weights)
        if candidate in corral or gram_weights[candidate] >= value - noise:
            break
        previous = (list(corral), weights.copy(), value)
        corral.append(candidate)
        # Minor cycle: move towards the affine minimiser of the corral,
        # dropping vertices whose weight would turn negative on the way.
        for _ in range(num_tasks + 1):
            w, ok = _affine_minimiser(gram, corral)
            if not ok:
                break
            current = weights[corral]
            if np.all(w > zero_tol):
                weights[:] = 0.0
                weights[corral] = w
                break
            blocked = w <= zero_tol
            theta = np.min(current[blocked] / (current[blocked] - w[blocked]))
            current = current + theta * (w - current)
            keep = current > zero_tol
            # Always drop at least the blocking vertex.
            keep[np.flatnonzero(blocked)[np.argmin(current[blocked])]] = False
            if not np.any(keep):
                break
            corral = [j for j, k in zip(corral, keep) if k]
            weights[:] = 0.0
            weights[corral] = current[keep]
            weights /= weights.sum()
        new_value = objective(gram, weights)
        if not new_value < value:  # no progress at this precision: stop
            corral, weights, value = previous
            break
        value = new_value
    weights = np.maximum(weights, 0.0)
    return weights / weights.sum()


def brute_force_min_norm(gram):
    """Minimiser over the simplex by enumerating all 2**T - 1 supports.

    Args:
        gram: (T, T) positive semi-definite Gram matrix, T <= 12.

    Returns:
        (T,) float64 weights on the simplex.
    """
    gram = np.asarray(gram, dtype=np.float64)
    num_tasks = gram.shape[0]
    if num_tasks > 12:
        raise ValueError("brute force is for T <= 12")
    best, best_value = None, np.inf
    for size in range(1, num_tasks + 1):
        for support in itertools.combinations(range(num_tasks), size):
            w, ok = _affine_minimiser(gram, list(support))
            if not ok or np.min(w) < -1e-9:
                continue
            weights = np.zeros(num_tasks)
            weights[list(support)] = np.maximum(w, 0.0)
            if not weights.sum() > 0.5:  # garbage from a singular system
                continue
            weights /= weights.sum()
            value = objective(gram, weights)
            if value < best_value:
                best, best_value = weights, value
    return best


def _two_product(x, y):
    """Error-free product: x * y == p + e exactly (Dekker / Veltkamp)."""
    split = 134217729.0  # 2**27 + 1

    def halves(v):
        c = split * v
        high = c - (c - v)
        return high, v - high

    p = x * y
    xh, xl = halves(x)
    yh, yl = halves(y)
    e = ((xh * yh - p) + xh * yl + xl * yh) + xl * yl
    return p, e


def objective(gram, weights):
    """a^T M a, exact up to one final rounding (for |entries| in normal range).

    Each term a_i a_j M_ij is expanded into four floats whose sum is exact,
    and math.fsum adds them all with a single rounding.
    """
    gram = np.asarray(gram, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    shift = _power_of_two_scale(gram)
    gram = np.ldexp(gram, -shift)  # exact; keeps the products in range
    p1, e1 = _two_product(weights[:, None], weights[None, :])
    p2, e2 = _two_product(p1, gram)
    p3, e3 = _two_product(e1, gram)
    total = math.fsum(np.concatenate([p2.ravel(), e2.ravel(), p3.ravel(), e3.ravel()]))
    return math.ldexp(total, shift)
