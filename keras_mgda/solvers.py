"""Min-norm solvers for MGDA (Sener & Koltun, NeurIPS 2018).

The core problem: given the Gram matrix M = G G^T of T task gradients, find

    alpha = argmin_{a >= 0, sum(a) = 1}  a^T M a,

the weights of the minimum-norm point of the convex hull of the gradients.

The paper solves it with plain Frank-Wolfe, which stops with relative
objective gaps of 1e-3 and worse. `min_norm` solves it to working precision:

1. Rescale M by a power of two near its largest diagonal (lossless), so all
   tolerances are relative: gram and c * gram give the same weights.
2. Start from the best pair: the closed-form two-task solution, vectorised
   over all pairs (including each task alone). Exact for T = 2.
3. Optionally (`max_iters` > 0), pairwise Frank-Wolfe with exact line
   search (weight moves from the worst task in the support to the best task
   overall) until the duality gap is below `tol`: a cheap guess of the
   support, worth it for jitted JAX at T ~ 100.
4. Polish with the active-set method of `keras_mgda.primal_dual`: each
   round solves the KKT system on the current free set exactly (one linear
   solve, with a rounding-level proximal term so that identical or
   collinear gradients stay solvable); the first rounds bind every task
   whose weight comes out <= 0 and free every task that violates the KKT
   conditions, all at once, later ones cut the step where a weight
   reaches 0 (which cannot cycle); it stops at the second round in a row
   in which no task changes side.

A caveat on "exact": where the optimum is 0 to within rounding (the origin
is in the hull) and M was computed in floating point, M is itself indefinite
at the level eps * max M_ii, and the optimum is only defined to about that.

Everything is written with `keras.ops` (or the namespace passed as `ops`),
so it runs on TensorFlow, JAX and PyTorch, inside `tf.function` and
`jax.jit`: loops have fixed shapes and an iteration cap, and there is no
Python branching on tensor values.
"""

from typing import Any

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.primal_dual import primal_dual_min_norm
from keras_mgda.types import ArrayLike
from keras_mgda.types import Ops
from keras_mgda.types import Tensor

__all__ = [
    "DEFAULT_TOL",
    "NORMALIZATIONS",
    "check_normalization",
    "min_norm",
    "min_norm_from_vectors",
    "normalization_divisors",
    "normalize_gram",
]

NORMALIZATIONS = ("l2", "loss", "loss+", "none")
"""The gradient normalisations `normalize_gram` and `MGDA(normalization=...)` accept."""

# Frank-Wolfe only warm-starts the polish, so its default tolerance (on the
# duality gap, relative to the largest M_ii) is loose. By default it is not
# run at all (max_iters=0): from the best pair, the polish alone is as fast
# under jax.jit up to T ~ 50, and 3-5x faster op by op (tf.function, torch).
DEFAULT_TOL = {"float32": 1e-5, "float64": 1e-8}
"""The Frank-Wolfe warm start's default tolerance by dtype (duality gap, relative to the largest M_ii)."""


def _best_pair(gram, pair_mask, ops):
    """Best two-task solution over all pairs (i, j), i == j meaning task i.

    On the segment between g_i and g_j, the weight on g_i that minimises the
    norm is clip((M_jj - M_ij) / |g_i - g_j|^2, 0, 1).
    """
    num_tasks = gram.shape[-1]
    dtype = nx.float_dtype(gram)
    diag = ops.diagonal(gram, axis1=-2, axis2=-1)
    d_i = diag[..., :, None]
    d_j = diag[..., None, :]
    spread = d_i + d_j - 2.0 * gram  # |g_i - g_j|^2
    safe_spread = ops.where(spread > 0, spread, ops.ones_like(spread))
    weight_i = ops.where(spread > 0, ops.clip((d_j - gram) / safe_spread, 0.0, 1.0), 1.0)
    weight_j = 1.0 - weight_i
    value = weight_i * weight_i * d_i + 2.0 * weight_i * weight_j * gram + weight_j * weight_j * d_j
    # Rank by an upper bound: a near-cancelling pair of large gradients can
    # round below a genuinely tiny one, which then would never be found.
    noise = weight_i * weight_i * d_i + 2.0 * weight_i * weight_j * ops.abs(gram) + weight_j * weight_j * d_j
    value = ops.where(pair_mask, value + 8.0 * nx.eps(dtype) * noise, np.inf)
    best_j = nx.argmin(value, ops=ops)  # (..., T): best partner of each i
    best_i = nx.argmin(ops.min(value, axis=-1), ops=ops)  # (...,)
    best_j = ops.take_along_axis(best_j, best_i[..., None], axis=-1)[..., 0]
    one_i = nx.one_hot(best_i, num_tasks, dtype, ops=ops)
    one_j = nx.one_hot(best_j, num_tasks, dtype, ops=ops)
    w = nx.dot(nx.matvec(weight_i, one_j, ops=ops), one_i, ops=ops)[..., None]
    return w * one_i + (1.0 - w) * one_j


def _two_tasks(gram, mask, ops):
    """The exact solution for two tasks (the paper's Algorithm 1): the
    clipped minimiser on the segment between g_0 and g_1, in a few ops
    (the common case, where `_best_pair`'s search over pairs is overhead).
    Identical gradients give [1, 0], as `_best_pair` does."""
    d_0, d_1, cross = gram[..., 0, 0], gram[..., 1, 1], gram[..., 0, 1]
    spread = d_0 + d_1 - 2.0 * cross  # |g_0 - g_1|^2
    safe_spread = ops.where(spread > 0, spread, ops.ones_like(spread))
    weight_0 = ops.where(spread > 0, ops.clip((d_1 - cross) / safe_spread, 0.0, 1.0), 1.0)
    # A masked-out task leaves the other alone.
    weight_0 = ops.where(mask[..., 0] & mask[..., 1], weight_0, ops.cast(mask[..., 0], gram.dtype))
    return ops.concatenate([weight_0[..., None], 1.0 - weight_0[..., None]], axis=-1)


def _frank_wolfe(gram, mask, weights, max_iters, tol, ops):
    """Pairwise Frank-Wolfe with exact line search, incremental M @ a.

    Each step moves weight from the support task with the largest (M a)_i
    to the task with the smallest, by the exact minimiser along that line.
    Stops when (M a)_max_support - (M a)_min <= tol (a duality-gap bound).
    """
    num_tasks = gram.shape[-1]
    dtype = nx.float_dtype(gram)
    tiny = nx.const(np.finfo(dtype).tiny, gram, ops=ops)

    def select(weights, gram_weights):  # (toward, away, still above tol)
        toward = ops.where(mask, gram_weights, np.inf)
        away = ops.where(weights > 0, gram_weights, -np.inf)
        gap = ops.max(away, axis=-1) - ops.min(toward, axis=-1)
        return nx.argmin(toward, ops=ops), nx.argmax(away, ops=ops), gap > tol

    def body(weights, gram_weights, active):
        toward, away, _ = select(weights, gram_weights)
        one_toward = nx.one_hot(toward, num_tasks, dtype, ops=ops)
        one_away = nx.one_hot(away, num_tasks, dtype, ops=ops)
        direction = one_toward - one_away
        gram_direction = nx.matvec(gram, direction, ops=ops)
        slope = -nx.dot(gram_weights, direction, ops=ops)
        curvature = nx.maximum(nx.dot(gram_direction, direction, ops=ops), tiny, ops=ops)
        step = nx.minimum(slope / curvature, nx.dot(weights, one_away, ops=ops), ops=ops)
        step = ops.where(active, step, 0.0)[..., None]
        weights = weights + step * direction
        # Drop the away task exactly when the step empties it.
        weights = ops.where((one_away > 0) & (weights <= 0), 0.0, weights)
        gram_weights = gram_weights + step * gram_direction
        _, _, next_active = select(weights, gram_weights)
        return weights, gram_weights, active & next_active

    gram_weights = nx.matvec(gram, weights, ops=ops)
    active = select(weights, gram_weights)[2]
    weights, _, _ = ops.while_loop(
        lambda weights, gram_weights, active: ops.any(active),
        body,
        (weights, gram_weights, active),
        maximum_iterations=max_iters,
    )
    return weights


def _polish(gram, mask, weights, ops):
    """The exact active-set method of `keras_mgda.primal_dual`, from the
    warm start `weights` (its support is the first free set)."""
    return primal_dual_min_norm(gram, weights, mask, ops=ops)


def min_norm(
    gram: ArrayLike,
    mask: ArrayLike | None = None,
    max_iters: int | None = None,
    tol: float | None = None,
    *,
    ops: Ops = keras.ops,
) -> Tensor:
    """Minimum-norm point of the convex hull of T task gradients.

    Solves `min a^T M a` over the probability simplex {a >= 0, sum(a) = 1}
    for the Gram matrix `M = G G^T` of the task gradients G, batched over
    leading dimensions, to working precision: best pair, optionally pairwise
    Frank-Wolfe, then an exact active-set polish (see the module docstring).

    Args:
        gram: (..., T, T) symmetric positive semi-definite Gram matrix, with
            a static T. float32 or float64; the computation stays in that
            dtype (float16 / bfloat16 are solved in float32).
        mask: optional boolean (..., T). Tasks with mask False are left out
            of the problem and get weight exactly 0. If every task of a batch
            element is masked out, its weights are uniform, 1 / T.
        max_iters: Frank-Wolfe steps to warm-start the polish with (default
            0). Only speed depends on it, not the accuracy of the result:
            about 2 T is faster under jax.jit for T ~ 100.
        tol: Frank-Wolfe duality-gap tolerance, relative to the largest
            squared gradient norm (default 1e-5 in float32, 1e-8 in float64).
        ops: the namespace of array functions to compute with: `keras.ops`
            (default), or `keras_mgda.backend.numpy_ops` for NumPy arrays.

    Returns:
        alpha: (..., T) weights, >= 0 and summing to 1, in the dtype of
        `gram`, not differentiable (gradients are stopped). Scale invariant:
        `gram` and `c * gram` give the same weights. A batch element whose
        gram contains NaN or Inf gets all-NaN weights (the loops are capped,
        so it never hangs); callers can test for it.

    Example:

    ```python
    g = np.array([[1.0, 0.0], [0.0, 2.0]])  # two task gradients
    alpha = keras_mgda.solvers.min_norm(g @ g.T)  # [0.8, 0.2]
    ```
    """
    gram = ops.stop_gradient(ops.convert_to_tensor(gram))  # alpha is a constant
    dtype = nx.float_dtype(gram)
    compute_dtype = dtype if dtype in ("float32", "float64") else "float32"
    gram = ops.cast(gram, compute_dtype)
    num_tasks = gram.shape[-1]
    if num_tasks is None or gram.shape[-2] != num_tasks:
        raise ValueError(f"gram must have a static (..., T, T) shape, got {gram.shape}")
    max_iters = 0 if max_iters is None else int(max_iters)
    tol = DEFAULT_TOL[compute_dtype] if tol is None else float(tol)

    finite = ops.all(ops.isfinite(gram), axis=(-2, -1))
    diag = ops.diagonal(gram, axis1=-2, axis2=-1)
    mask = ops.ones_like(diag, dtype="bool") if mask is None else ops.cast(mask, "bool")
    mask = mask & ops.ones_like(diag, dtype="bool")  # broadcast to (..., T)
    any_active = ops.any(mask, axis=-1)
    # All masked out: solve the unmasked problem, replaced by uniform below.
    mask = mask | ~any_active[..., None]
    pair_mask = mask[..., :, None] & mask[..., None, :]

    # Keep non-finite and masked entries out of the arithmetic.
    gram = ops.where(finite[..., None, None], gram, ops.eye(num_tasks, dtype=compute_dtype))
    gram = ops.where(pair_mask, gram, 0.0)
    largest = ops.max(ops.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
    largest = ops.where(largest > 0, largest, 1.0)
    gram = gram / nx.power_of_two_near(largest, ops=ops)[..., None, None]

    weights = _solve_scaled(gram, mask, pair_mask, max_iters, tol, ops)
    weights = ops.where(mask, weights, 0.0)
    weights = weights / ops.sum(weights, axis=-1, keepdims=True)
    uniform = nx.const(1.0 / num_tasks, weights, ops=ops)
    weights = ops.where(any_active[..., None], weights, uniform)
    weights = ops.where(finite[..., None], weights, np.nan)
    return ops.cast(weights, dtype)


def _solve_scaled(gram, mask, pair_mask, max_iters, tol, ops):
    """min_norm's solve on a finite Gram matrix scaled to max M_ii ~ 1."""
    num_tasks = gram.shape[-1]
    if num_tasks == 1:
        return ops.ones_like(gram[..., 0])
    if num_tasks == 2:  # the best pair is the exact solution
        return _two_tasks(gram, mask, ops)
    weights = _best_pair(gram, pair_mask, ops)
    if max_iters > 0:
        weights = _frank_wolfe(gram, mask, weights, max_iters, tol, ops)
    return _polish(gram, mask, weights, ops)


def min_norm_from_vectors(
    vectors: ArrayLike, mask: ArrayLike | None = None, *, ops: Ops = keras.ops, **kwargs: Any
) -> Tensor:
    """`min_norm` for explicit task gradients.

    Args:
        vectors: (..., T, D) task gradients (flattened), float32 or float64.
        mask: optional boolean (..., T), as in `min_norm`.
        ops: the array namespace, as in `min_norm`.
        **kwargs: `max_iters`, `tol`, passed to `min_norm`.

    Returns:
        alpha: (..., T) weights on the simplex, in the dtype of `vectors`.

    Example:

    ```python
    alpha = keras_mgda.solvers.min_norm_from_vectors([[1.0, 0.0], [0.0, 2.0]])
    ```
    """
    vectors = ops.convert_to_tensor(vectors)
    vectors = ops.cast(vectors, nx.float_dtype(vectors))
    gram = ops.einsum("...id,...jd->...ij", vectors, vectors)
    return min_norm(gram, mask=mask, ops=ops, **kwargs)


def normalization_divisors(
    gram: ArrayLike,
    losses: ArrayLike,
    normalization: str = "loss+",
    epsilon: float = 1e-12,
    *,
    ops: Ops = keras.ops,
) -> Tensor:
    """Per-task divisors n_t for gradient normalisation, as in MGDA's code.

    Dividing gradient t by n_t changes the min-norm weights only; the caller
    applies those weights to the raw losses.

    Args:
        gram: (..., T, T) Gram matrix of the task gradients.
        losses: (..., T) task losses.
        normalization: `"l2"` (n_t = ||g_t|| = sqrt(M_tt)), `"loss"`
            (n_t = |L_t|), `"loss+"` (n_t = |L_t| ||g_t||) or `"none"` (1).
        epsilon: floor of every divisor, n_t = max(n_t, epsilon).
        ops: the array namespace, as in `min_norm`.

    Returns:
        (..., T) divisors, in the dtype of `gram`.

    Raises:
        ValueError: for an unknown `normalization`.

    Example:

    ```python
    n = normalization_divisors(gram, losses, "l2")
    alpha = min_norm(normalize_gram(gram, n))
    ```
    """
    check_normalization(normalization)
    gram = ops.convert_to_tensor(gram)
    dtype = nx.float_dtype(gram)
    gram = ops.cast(gram, dtype)
    losses = ops.cast(losses, dtype)
    # Clamp at 0: rounding can make a zero gradient's M_tt slightly negative.
    zero = nx.const(0.0, gram, ops=ops)
    norms = ops.sqrt(nx.maximum(ops.diagonal(gram, axis1=-2, axis2=-1), zero, ops=ops))
    if normalization == "l2":
        divisors = norms
    elif normalization == "loss":
        divisors = ops.abs(losses) * ops.ones_like(norms)
    elif normalization == "loss+":
        divisors = ops.abs(losses) * norms
    else:
        divisors = ops.ones_like(norms)
    return nx.maximum(divisors, nx.const(epsilon, gram, ops=ops), ops=ops)


def check_normalization(normalization: str) -> None:
    """Raises a ValueError naming the choices for an unknown normalisation."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown normalization {normalization!r}; use one of {NORMALIZATIONS}."
        )


def normalize_gram(gram: ArrayLike, divisors: ArrayLike, *, ops: Ops = keras.ops) -> Tensor:
    """Gram matrix of the normalised gradients g_t / n_t.

    Args:
        gram: (..., T, T) Gram matrix.
        divisors: (..., T) positive divisors, e.g. from `normalization_divisors`.
        ops: the array namespace, as in `min_norm`.

    Returns:
        (..., T, T) matrix M_ij / (n_i n_j).

    Example:

    ```python
    normalized = normalize_gram(gram, normalization_divisors(gram, losses, "l2"))
    ```
    """
    gram = ops.convert_to_tensor(gram)
    divisors = ops.cast(divisors, nx.float_dtype(gram))
    # Divide twice rather than by the product, which could overflow.
    return gram / divisors[..., :, None] / divisors[..., None, :]
