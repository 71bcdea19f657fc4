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
4. Polish with a primal active-set method: each round solves the KKT system
   on the current free set exactly (one linear solve, with a vanishing
   proximal term so that identical or collinear gradients stay solvable),
   line-searches exactly along that step within the simplex, drops the task
   whose weight reaches 0, adds every task that violates the KKT
   conditions, and stops when they hold to rounding noise.

A caveat on "exact": where the optimum is 0 to within rounding (the origin
is in the hull) and M was computed in floating point, M is itself indefinite
at the level eps * max M_ii, and the optimum is only defined to about that.

Everything is written with `keras.ops`, so it runs on TensorFlow, JAX and
PyTorch, inside `tf.function` and `jax.jit`: loops have fixed shapes and an
iteration cap, and there is no Python branching on tensor values.
"""

import contextlib
import sys

import numpy as np
from keras import backend
from keras import ops

NORMALIZATIONS = ("l2", "loss", "loss+", "none")

# Frank-Wolfe only warm-starts the polish, so its default tolerance (on the
# duality gap, relative to the largest M_ii) is loose. By default it is not
# run at all (max_iters=0): from the best pair, the polish alone is as fast
# under jax.jit up to T ~ 50, and 3-5x faster op by op (tf.function, torch).
DEFAULT_TOL = {"float32": 1e-5, "float64": 1e-8}
# A task joins the free set when it is below the current point by more than
# JOIN_NOISE times the rounding noise of (M a)_j; lower values chase noise on
# inexact Gram matrices.
JOIN_NOISE = 16.0


_NAMESPACED_MODULES = ["keras_mgda.step"] + [
    f"keras_mgda.weighting.{name}"
    for name in ("mgda", "pcgrad", "cagrad", "imtl", "nash_mtl", "aligned_mtl", "upgrad", "_gradient_base")
]


@contextlib.contextmanager
def op_namespace(namespace):
    """Runs the solver's functions with another implementation of the
    `keras.ops` functions they use (for example direct torch calls, which
    skip Keras's per-op argument conversion in eager mode). Not thread-safe.

    Args:
        namespace: a module or object with the same functions as
            `keras.ops` (see `keras_mgda/backend/torch_ops.py`).

    Example:

    ```python
    with op_namespace(fast_ops):
        alpha = min_norm(gram)
    ```
    """
    global ops
    previous = ops
    # The gradient weightings solve their own small problems with the same
    # ops, and the step checks their results: swap theirs too (each imports
    # `from keras import ops`; each is tested to weigh alike both ways).
    modules = [
        sys.modules[name]
        for name in _NAMESPACED_MODULES
        if name in sys.modules and getattr(sys.modules[name], "ops", None) is previous
    ]
    ops = namespace
    for module in modules:
        module.ops = namespace
    try:
        yield
    finally:
        ops = previous
        for module in modules:
            module.ops = previous


_FLOAT_DTYPES = {}


def _float_dtype(x):
    # Cached: standardize_dtype costs ~15 us, and the eager solvers ask
    # for it a few times per loop round.
    key = (x.dtype, backend.floatx())
    dtype = _FLOAT_DTYPES.get(key)
    if dtype is None:
        dtype = backend.standardize_dtype(x.dtype)
        if "float" not in dtype:
            dtype = backend.floatx()
        _FLOAT_DTYPES[key] = dtype
    return dtype


# keras' torch backend returns float32 from maximum, minimum and floor even
# for float64 tensors, and rounds Python scalars in `where` to float32; its
# JAX argmin / argmax compare float64 values in float32. Hence these helpers,
# and typed constants wherever a scalar is not exact in float32.


def _const(value, like):  # (ops.cast of a Python float goes via float32 on TF)
    return ops.convert_to_tensor(value, dtype=_float_dtype(like))


def _maximum(x, y):  # NaN in x propagates, as with ops.maximum
    return ops.where(x < y, y, x)


def _minimum(x, y):
    return ops.where(x > y, y, x)


def _argmin(x):
    return ops.argmax(ops.cast(x == ops.min(x, axis=-1, keepdims=True), "int32"), axis=-1)


def _argmax(x):
    return ops.argmax(ops.cast(x == ops.max(x, axis=-1, keepdims=True), "int32"), axis=-1)


def _matvec(matrix, vector):
    if backend.backend() == "torch":  # keras' torch einsum costs ~10 small ops
        return ops.sum(matrix * vector[..., None, :], axis=-1)
    return ops.einsum("...ij,...j->...i", matrix, vector)


def _one_hot(index, num_tasks, dtype):  # (ops.one_hot is slow on torch)
    return ops.cast(ops.arange(num_tasks, dtype="int32") == ops.cast(index, "int32")[..., None], dtype)


def _dot(x, y):
    return ops.sum(x * y, axis=-1)


def _power_of_two_near(x):
    """2**round(log2(x)) for x > 0: dividing by it is exact. (Rounded, not
    floored: log2 of an exact power of two may come out a hair low.)"""
    return ops.power(_const(2.0, x), ops.round(ops.log2(x)))


def _best_pair(gram, pair_mask):
    """Best two-task solution over all pairs (i, j), i == j meaning task i.

    On the segment between g_i and g_j, the weight on g_i that minimises the
    norm is clip((M_jj - M_ij) / |g_i - g_j|^2, 0, 1).
    """
    num_tasks = gram.shape[-1]
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
    eps = float(np.finfo(_float_dtype(gram)).eps)
    value_noise = weight_i * weight_i * d_i + 2.0 * weight_i * weight_j * ops.abs(gram) + weight_j * weight_j * d_j
    value = ops.where(pair_mask, value + 8.0 * eps * value_noise, np.inf)
    best_j = _argmin(value)  # (..., T): best partner of each i
    best_i = _argmin(ops.min(value, axis=-1))  # (...,)
    best_j = ops.take_along_axis(best_j, best_i[..., None], axis=-1)[..., 0]
    one_i = _one_hot(best_i, num_tasks, _float_dtype(gram))
    one_j = _one_hot(best_j, num_tasks, _float_dtype(gram))
    w = _dot(_matvec(weight_i, one_j), one_i)[..., None]
    return w * one_i + (1.0 - w) * one_j


def _two_tasks(gram, mask):
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


def _frank_wolfe(gram, mask, weights, max_iters, tol):
    """Pairwise Frank-Wolfe with exact line search, incremental M @ a.

    Each step moves weight from the support task with the largest (M a)_i
    to the task with the smallest, by the exact minimiser along that line.
    Stops when (M a)_max_support - (M a)_min <= tol (a duality-gap bound).
    """
    num_tasks = gram.shape[-1]
    dtype = _float_dtype(gram)
    tiny = _const(np.finfo(dtype).tiny, gram)

    def select(weights, gram_weights):  # (toward, away, still above tol)
        toward = ops.where(mask, gram_weights, np.inf)
        away = ops.where(weights > 0, gram_weights, -np.inf)
        gap = ops.max(away, axis=-1) - ops.min(toward, axis=-1)
        return _argmin(toward), _argmax(away), gap > tol

    def cond(weights, gram_weights, active):
        return ops.any(active)

    def body(weights, gram_weights, active):
        toward, away, _ = select(weights, gram_weights)
        one_toward = _one_hot(toward, num_tasks, dtype)
        one_away = _one_hot(away, num_tasks, dtype)
        direction = one_toward - one_away
        gram_direction = _matvec(gram, direction)
        slope = -_dot(gram_weights, direction)
        curvature = _maximum(_dot(gram_direction, direction), tiny)
        step = _minimum(slope / curvature, _dot(weights, one_away))
        step = ops.where(active, step, 0.0)[..., None]
        weights = weights + step * direction
        # Drop the away task exactly when the step empties it.
        weights = ops.where((one_away > 0) & (weights <= 0), 0.0, weights)
        gram_weights = gram_weights + step * gram_direction
        _, _, next_active = select(weights, gram_weights)
        return weights, gram_weights, active & next_active

    gram_weights = _matvec(gram, weights)
    active = select(weights, gram_weights)[2]
    weights, _, _ = ops.while_loop(
        cond, body, (weights, gram_weights, active), maximum_iterations=max_iters
    )
    return weights


def _polish(gram, mask, weights, max_rounds):
    """Primal active-set method with exact (proximal) KKT solves.

    Each round solves  min a^T M a + delta * sum_i M_ii (a_i - a_prev_i)^2
    over {sum(a) = 1, a_i = 0 off the free set} exactly. The proximal term
    keeps the system non-singular for identical or collinear gradients and
    vanishes at convergence (a = a_prev), so the limit is the exact optimum.
    The step is then extended by an exact line search (the proximal step
    undershoots along weakly curved directions) and cut where the first
    weight reaches 0, which drops that task; at the line minimum, every task
    below the current point ((M a)_j < a^T M a, a violated KKT condition)
    joins. Done when the proximal pull is below rounding noise: the KKT
    conditions hold to working precision.
    """
    num_tasks = gram.shape[-1]
    dtype = _float_dtype(gram)
    eps = float(np.finfo(dtype).eps)
    # The proximal weight of task i is delta * M_ii: relative to each task's
    # own scale, so tiny gradients next to huge ones are still resolved.
    # M_ii is floored at eps**2 (M is scaled to max M_ii ~ 1).
    scale = ops.sqrt(_maximum(ops.diagonal(gram, axis1=-2, axis2=-1), _const(eps * eps, gram)))
    delta = float(np.sqrt(eps))
    ridge = delta * scale * scale
    # The KKT system is solved in the variables b = scale * a, where it is
    # C = M_ij / (scale_i scale_j) (unit diagonal) plus delta * I: well
    # conditioned, and never exactly singular, which TF and torch reject.
    unit_gram = gram / scale[..., :, None] / scale[..., None, :]
    eye = ops.eye(num_tasks, dtype=dtype)
    abs_gram = ops.abs(gram)

    def products(weights):
        """M a, and the rounding noise of each (M a)_j - a^T M a."""
        abs_gram_weights = _matvec(abs_gram, weights)
        noise = eps * (abs_gram_weights + _dot(weights, abs_gram_weights)[..., None])
        return _matvec(gram, weights), noise

    def proximal_target(weights, free):
        # [[C_FF + delta I, s u], [s u^T, 0]] [b; -lambda / s] = [delta b_prev; s]
        # with u = 1 / scale (so sum(a) = u^T b = 1) and s = 1 / max_F u,
        # identity rows off the free set F. Bordered rather than eliminated:
        # the solution stays O(1) even when C_FF is singular, so it is accurate.
        free_f = ops.cast(free, dtype)
        border = free_f / scale
        border_scale = 1.0 / ops.max(border, axis=-1, keepdims=True)
        border = border * border_scale
        system = unit_gram * free_f[..., :, None] * free_f[..., None, :]
        system = system + eye * ops.where(free, _const(delta, gram), 1.0)[..., None]
        system = ops.concatenate([system, border[..., :, None]], axis=-1)
        border_row = ops.concatenate([border, ops.zeros_like(border[..., :1])], axis=-1)
        system = ops.concatenate([system, border_row[..., None, :]], axis=-2)
        rhs = ops.concatenate([delta * scale * weights * free_f, border_scale], axis=-1)
        return ops.solve(system, rhs[..., None])[..., :num_tasks, 0] / scale

    def cond(weights, gram_weights, noise, free, done):
        return ~ops.all(done)

    def body(weights, gram_weights, noise, free, done):
        direction = proximal_target(weights, free) - weights
        # Settled: the proximal pull is below rounding noise, so the KKT
        # conditions hold on the free set to working precision.
        settled = ops.all(ridge * ops.abs(direction) <= noise, axis=-1)

        # Exact line search along the step: f(a + t d) is least at
        # t = -slope / curvature (>= 1 in exact arithmetic). Where the
        # curvature is lost in rounding, f is flat: go to the boundary.
        gram_direction = _matvec(gram, direction)
        slope = _dot(gram_weights, direction)
        curvature = _dot(gram_direction, direction)
        curved = curvature > 16.0 * eps * ops.square(_dot(ops.abs(direction), scale))
        descent = (slope < 0) & ~settled
        length = ops.where(
            curved,
            _maximum(-slope / ops.where(curved, curvature, 1.0), _const(1.0, gram)),
            1.0 / eps,
        )
        length = ops.where(descent, length, 1.0)[..., None]
        # Ratio test: stop where the first weight reaches 0, and drop it.
        shrinking = free & (direction < 0)
        ratio = ops.where(shrinking, weights / ops.where(shrinking, -direction, 1.0), np.inf)
        step = _minimum(ops.min(ratio, axis=-1, keepdims=True), length)
        blocked = ratio <= step
        moved = weights + step * direction
        moved = ops.where(blocked | (moved < 0), 0.0, moved)
        moved = moved / ops.sum(moved, axis=-1, keepdims=True)
        at_line_minimum = ~ops.any(blocked, axis=-1)
        # A failed solve (underflow, non-PSD input) ends polishing there.
        failed = ~ops.all(ops.isfinite(moved), axis=-1)
        moved = ops.where(failed[..., None], weights, moved)

        # KKT check at the new point: no task outside the free set may be
        # below it, (M a)_j >= a^T M a, beyond rounding noise.
        gram_moved, moved_noise = products(moved)
        value = _dot(moved, gram_moved)[..., None]
        kept = free & ~blocked
        below = mask & ~kept & (gram_moved - value + JOIN_NOISE * moved_noise < 0)
        joining = below & at_line_minimum[..., None]
        now_done = (settled & at_line_minimum & ~ops.any(joining, axis=-1)) | failed

        def update(new, old):
            return ops.where(done[..., None], old, new)

        return (
            update(moved, weights),
            update(gram_moved, gram_weights),
            update(moved_noise, noise),
            update(kept | joining, free),
            done | now_done,
        )

    gram_weights, noise = products(weights)
    free = weights > 0
    done = ops.zeros_like(weights[..., 0], dtype="bool")
    weights, _, _, _, _ = ops.while_loop(
        cond, body, (weights, gram_weights, noise, free, done), maximum_iterations=max_rounds
    )
    return weights


def min_norm(gram, mask=None, max_iters=None, tol=None):
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
    dtype = _float_dtype(gram)
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
    gram = gram / _power_of_two_near(largest)[..., None, None]

    if num_tasks == 1:
        weights = ops.ones_like(gram[..., 0])
    elif num_tasks == 2:
        weights = _two_tasks(gram, mask)
    else:
        weights = _best_pair(gram, pair_mask)
    if num_tasks > 2:  # for two tasks the best pair is the exact solution
        if max_iters > 0:
            weights = _frank_wolfe(gram, mask, weights, max_iters, tol)
        weights = _polish(gram, mask, weights, max_rounds=2 * num_tasks + 16)

    weights = ops.where(mask, weights, 0.0)
    weights = weights / ops.sum(weights, axis=-1, keepdims=True)
    weights = ops.where(any_active[..., None], weights, _const(1.0 / num_tasks, weights))
    weights = ops.where(finite[..., None], weights, np.nan)
    return ops.cast(weights, dtype)


def min_norm_from_vectors(vectors, mask=None, **kwargs):
    """`min_norm` for explicit task gradients.

    Args:
        vectors: (..., T, D) task gradients (flattened), float32 or float64.
        mask: optional boolean (..., T), as in `min_norm`.
        **kwargs: `max_iters`, `tol`, passed to `min_norm`.

    Returns:
        alpha: (..., T) weights on the simplex, in the dtype of `vectors`.

    Example:

    ```python
    alpha = keras_mgda.solvers.min_norm_from_vectors([[1.0, 0.0], [0.0, 2.0]])
    ```
    """
    vectors = ops.convert_to_tensor(vectors)
    vectors = ops.cast(vectors, _float_dtype(vectors))
    gram = ops.einsum("...id,...jd->...ij", vectors, vectors)
    return min_norm(gram, mask=mask, **kwargs)


def normalization_divisors(gram, losses, normalization="loss+", epsilon=1e-12):
    """Per-task divisors n_t for gradient normalisation, as in MGDA's code.

    Dividing gradient t by n_t changes the min-norm weights only; the caller
    applies those weights to the raw losses.

    Args:
        gram: (..., T, T) Gram matrix of the task gradients.
        losses: (..., T) task losses.
        normalization: `"l2"` (n_t = ||g_t|| = sqrt(M_tt)), `"loss"`
            (n_t = |L_t|), `"loss+"` (n_t = |L_t| ||g_t||) or `"none"` (1).
        epsilon: floor of every divisor, n_t = max(n_t, epsilon).

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
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown normalization {normalization!r}; use one of {NORMALIZATIONS}."
        )
    gram = ops.convert_to_tensor(gram)
    dtype = _float_dtype(gram)
    gram = ops.cast(gram, dtype)
    losses = ops.cast(losses, dtype)
    # Clamp at 0: rounding can make a zero gradient's M_tt slightly negative.
    norms = ops.sqrt(_maximum(ops.diagonal(gram, axis1=-2, axis2=-1), _const(0.0, gram)))
    if normalization == "l2":
        divisors = norms
    elif normalization == "loss":
        divisors = ops.abs(losses) * ops.ones_like(norms)
    elif normalization == "loss+":
        divisors = ops.abs(losses) * norms
    else:
        divisors = ops.ones_like(norms)
    return _maximum(divisors, _const(epsilon, gram))


def normalize_gram(gram, divisors):
    """Gram matrix of the normalised gradients g_t / n_t.

    Args:
        gram: (..., T, T) Gram matrix.
        divisors: (..., T) positive divisors, e.g. from `normalization_divisors`.

    Returns:
        (..., T, T) matrix M_ij / (n_i n_j).

    Example:

    ```python
    normalized = normalize_gram(gram, normalization_divisors(gram, losses, "l2"))
    ```
    """
    gram = ops.convert_to_tensor(gram)
    divisors = ops.cast(divisors, _float_dtype(gram))
    # Divide twice rather than by the product, which could overflow.
    return gram / divisors[..., :, None] / divisors[..., None, :]
