"""Property tests for keras_mgda.solvers, run on whichever Keras backend is
active (KERAS_BACKEND=tensorflow|jax|torch).

Accuracy is measured against an exact reference QP (tests/qp_reference.py):

    rel_gap = (f(alpha) - f*) / max(f*, eps_dtype * max_i M_ii)

with f(a) = a^T M a evaluated in float64 on the returned alpha cast to
float64 (summed exactly, with error-free products, so that the evaluation
itself adds no rounding: a naive float64 sum has errors of ~1e-16 * max M_ii,
as large as the whole budget when f* is 0), M the Gram matrix as given to the
solver (cast to float64), f* = f(exact_min_norm(M)), and eps_dtype the
machine epsilon of the input dtype. Targets: rel_gap <= 1e-10 in float64
and <= 1e-6 in float32.

One family is held to a weaker bound on purpose: real-valued gradients with
the origin inside their convex hull ("conflicting"). There f* = 0 in exact
arithmetic, but the rounded Gram matrix is indefinite at the 1e-16 level, so
the minimum over the simplex is only defined to about eps * max M_ii: the
solver and the reference then differ by up to that much in either direction
(rel_gap in [-1, 1]). The exact-data families with f* = 0 ("low_rank",
"opposite", "zero_gradient": small-integer gradients, so M is exact and
exactly PSD) are held to the full targets.
"""

import contextlib

import keras
import numpy as np
import pytest
from keras import ops
from qp_reference import brute_force_min_norm
from qp_reference import exact_min_norm
from qp_reference import objective

from keras_mgda import solvers

# The solver's mathematics is checked once, under torch; float32, the
# dtype the train step solves in, compiled (jax.jit, tf.function) on every
# backend (tests/conftest.py).
pytestmark = pytest.mark.one_backend

BACKEND = keras.backend.backend()
DTYPES = ["float32", "float64"]
ON_EVERY_BACKEND = pytest.mark.all_backends
DTYPE_PARAMS = [pytest.param("float32", marks=ON_EVERY_BACKEND), "float64"]
TARGET = {"float32": 1e-6, "float64": 1e-10}
EPS = {dtype: float(np.finfo(dtype).eps) for dtype in DTYPES}


@contextlib.contextmanager
def dtype_support(dtype):
    """JAX computes in float32 unless 64-bit types are switched on."""
    if BACKEND == "jax" and dtype == "float64":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


_COMPILED = {}


def compiled(function):
    """`function` compiled once per backend (jax.jit / tf.function), for speed.

    Eager JAX compiles every primitive and loop on each new call, and eager
    TensorFlow dispatches op by op; the suite would take minutes. XLA's
    backend optimisation is switched off: it halves compile time.
    """
    if function not in _COMPILED:
        if BACKEND == "jax":
            import jax

            _COMPILED[function] = jax.jit(
                function, compiler_options={"xla_backend_optimization_level": 0}
            )
        elif BACKEND == "tensorflow":
            import tensorflow as tf

            _COMPILED[function] = tf.function(function)
        else:
            _COMPILED[function] = function
    return _COMPILED[function]


def _min_norm_masked(gram, mask):
    return solvers.min_norm(gram, mask=mask)


def _min_norm_frank_wolfe_start(gram, mask):
    return solvers.min_norm(gram, mask=mask, max_iters=50)


def solve(gram, mask=None, frank_wolfe=False):
    """min_norm on numpy input, returned as numpy. The mask is always passed
    (all True by default) so that each shape is compiled only once."""
    gram = np.asarray(gram)
    if mask is None:
        mask = np.ones(gram.shape[:-1], dtype=bool)
    function = _min_norm_frank_wolfe_start if frank_wolfe else _min_norm_masked
    with dtype_support(gram.dtype.name):
        alpha = compiled(function)(gram, mask)
        return np.asarray(ops.convert_to_numpy(alpha))


def relative_gap(gram, alpha, dtype):
    gram = np.asarray(gram, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    best = objective(gram, exact_min_norm(gram))
    scale = max(best, EPS[dtype] * np.max(np.diag(gram)))
    gap = objective(gram, alpha) - best
    return gap / scale if scale > 0 else gap  # all gradients zero: 0


# ---------------------------------------------------------------- problems


def _integers(rng, shape):
    return rng.integers(-4, 5, size=shape).astype(np.float64)


def make_gradients(family, num_tasks, dtype, rng):
    """(T, D) task gradients of one problem family."""
    t = num_tasks
    if family == "random":  # general position, unique optimum, f* > 0
        return rng.standard_normal((t, t + 5))
    if family == "correlated":  # a shared direction, as in real multi-task nets
        return rng.standard_normal(32) + 1.5 * rng.standard_normal((t, 32))
    if family == "low_rank":  # exact data, usually 0 in the hull: f* = 0
        return _integers(rng, (t, max(1, t // 4)))
    if family == "near_collinear":  # very ill-conditioned M
        spread = 1e-7 if dtype == "float64" else 1e-3
        return rng.standard_normal(8) + spread * rng.standard_normal((t, 8))
    if family == "identical":  # repeated gradients: singular KKT systems
        distinct = rng.standard_normal((3, 6))
        return distinct[rng.integers(0, 3, size=t)]
    if family == "opposite":  # g and -g: f* = 0 exactly
        g = _integers(rng, (t, 6))
        g[-1] = -g[0]
        return g
    if family == "zero_gradient":  # one exactly zero gradient: f* = 0
        g = _integers(rng, (t, 6))
        g[rng.integers(t)] = 0.0
        return g
    if family == "mixed_scales":  # gradient norms from 1e-10 to 1e15
        return rng.standard_normal((t, 10)) * 10.0 ** rng.uniform(-10, 15, size=(t, 1))
    if family == "orthogonal":
        return np.diag(rng.uniform(0.5, 2.0, size=t))
    if family == "conflicting":  # real-valued, 0 in the hull (see module doc)
        return rng.standard_normal((t, max(2, t // 4)))
    raise ValueError(family)


FAMILIES = [
    "random",
    "correlated",
    "low_rank",
    "near_collinear",
    "identical",
    "opposite",
    "zero_gradient",
    "mixed_scales",
    "orthogonal",
]


def make_grams(family, num_tasks, dtype, count, seed=0):
    rng = np.random.default_rng([seed, num_tasks, (FAMILIES + ["conflicting"]).index(family)])
    grams = []
    for _ in range(count):
        g = make_gradients(family, num_tasks, dtype, rng)
        grams.append(g @ g.T)
    return np.stack(grams).astype(dtype)


# Tasks per problem; every batched call holds 8 problems (few shapes to
# compile on JAX).
SIZES = (2, 3, 8, 40)  # 2: the closed form the solver takes for two tasks
BATCH = 8


def kkt_violation(gram, alpha):
    """Largest KKT violation, relative to max M_ii, evaluated in float64.

    Optimality on the simplex: (M a)_i >= a^T M a for every i, with equality
    wherever a_i > 0.
    """
    gram = np.asarray(gram, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    gram_alpha = gram @ alpha
    value = alpha @ gram_alpha
    below = np.max(value - gram_alpha)
    support = alpha > 1e-3 * np.max(alpha)
    off_level = np.max(np.abs(gram_alpha[support] - value))
    return max(below, off_level) / np.max(np.diag(gram))


# ------------------------------------------------------------ the reference


@pytest.mark.parametrize("family", ["random", "low_rank", "identical", "opposite", "mixed_scales", "conflicting"])
def test_reference_matches_brute_force(family):
    # "conflicting" is only defined to rounding (see the module docstring).
    tolerance = 1.0 if family == "conflicting" else 1e-9
    for num_tasks in (2, 4, 7):
        for gram in make_grams(family, num_tasks, "float64", count=3, seed=1):
            exact = exact_min_norm(gram)
            brute = brute_force_min_norm(gram)
            assert np.all(exact >= 0) and abs(exact.sum() - 1) < 1e-12
            scale = max(objective(gram, brute), EPS["float64"] * np.max(np.diag(gram)))
            assert abs(objective(gram, exact) - objective(gram, brute)) <= tolerance * scale


# ---------------------------------------------------------- accuracy, KKT


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_on_simplex_optimal_and_exact(dtype, family):
    for num_tasks in SIZES:
        grams = make_grams(family, num_tasks, dtype, BATCH)
        alphas = solve(grams)
        assert alphas.dtype == np.dtype(dtype)
        assert alphas.shape == (BATCH, num_tasks)
        assert np.all(alphas >= 0)
        np.testing.assert_allclose(alphas.sum(-1), 1.0, atol=4 * num_tasks * EPS[dtype])
        for gram, alpha in zip(grams, alphas):
            assert relative_gap(gram, alpha, dtype) <= TARGET[dtype], (num_tasks, gram, alpha)
            if family != "mixed_scales":  # there KKT relative to max M_ii is vacuous
                assert kkt_violation(gram, alpha) <= 1e3 * EPS[dtype]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_ill_posed_conflicting_family_within_rounding(dtype):
    for num_tasks in SIZES:
        grams = make_grams("conflicting", num_tasks, dtype, BATCH)
        for gram, alpha in zip(grams, solve(grams)):
            assert np.all(alpha >= 0)
            assert relative_gap(gram, alpha, dtype) <= 1.0


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_hundred_tasks(dtype):
    grams = np.concatenate(
        [make_grams(f, 100, dtype, count=1, seed=2) for f in ("random", "low_rank", "correlated")]
    )
    for gram, alpha in zip(grams, solve(grams)):
        assert relative_gap(gram, alpha, dtype) <= TARGET[dtype]


def test_orthogonal_gradients_closed_form():
    norms2 = np.random.default_rng(18).uniform(0.1, 10.0, size=(BATCH, 8))
    grams = np.stack([np.diag(n) for n in norms2])
    expected = (1 / norms2) / np.sum(1 / norms2, axis=-1, keepdims=True)
    np.testing.assert_allclose(solve(grams), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_two_tasks_masked(dtype):
    grams = make_grams("random", 2, dtype, 4)
    masks = np.array([[True, False], [False, True], [False, False], [True, True]])
    alphas = solve(grams, mask=masks)
    np.testing.assert_array_equal(alphas[:3], [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert relative_gap(grams[3], alphas[3], dtype) <= TARGET[dtype]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_two_tasks_closed_form(dtype):
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(solve((g @ g.T).astype(dtype)), [0.8, 0.2], rtol=1e-6)
    # One gradient inside the other's half space: the shorter one alone.
    g = np.array([[1.0, 0.0], [3.0, 0.5]])
    np.testing.assert_allclose(solve((g @ g.T).astype(dtype)), [1.0, 0.0], atol=1e-7)


def plain_frank_wolfe(gram, max_iters=250, stop=1e-5):
    """The paper's Frank-Wolfe (Sener & Koltun, Algorithm 2, as in their code):
    best-pair start, exact line search towards the best vertex, at most 250
    steps, stop when the step moves the weights by less than 1e-5."""
    t = len(gram)

    def segment(v11, v12, v22):  # weight on the first end of the segment
        if v12 >= v11:
            return 1.0
        if v12 >= v22:
            return 0.0
        return (v22 - v12) / (v11 + v22 - 2 * v12)

    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    values = []
    for i, j in pairs:
        w = segment(gram[i, i], gram[i, j], gram[j, j])
        values.append(w * w * gram[i, i] + 2 * w * (1 - w) * gram[i, j] + (1 - w) ** 2 * gram[j, j])
    i, j = pairs[int(np.argmin(values))]
    alpha = np.zeros(t)
    alpha[i] = segment(gram[i, i], gram[i, j], gram[j, j])
    alpha[j] = 1 - alpha[i]
    for _ in range(max_iters):
        k = int(np.argmin(gram @ alpha))
        w = segment(alpha @ gram @ alpha, alpha @ gram[:, k], gram[k, k])
        new = w * alpha
        new[k] += 1 - w
        if np.sum(np.abs(new - alpha)) < stop:
            return new
        alpha = new
    return alpha


def test_plain_frank_wolfe_of_the_paper_is_not_exact():
    grams = make_grams("random", 8, "float64", BATCH, seed=3)
    plain = [relative_gap(m, plain_frank_wolfe(m), "float64") for m in grams]
    ours = [relative_gap(m, a, "float64") for m, a in zip(grams, solve(grams))]
    assert max(plain) > 1e-4
    assert max(ours) <= 1e-6


# ------------------------------------------------------------- invariances


@pytest.mark.parametrize("family", ["random", "low_rank", "identical", "mixed_scales"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_task_order_invariance(dtype, family):
    grams = make_grams(family, 8, dtype, BATCH, seed=4)
    rng = np.random.default_rng(5)
    perms = np.stack([rng.permutation(8) for _ in grams])
    permuted = np.stack([m[np.ix_(p, p)] for m, p in zip(grams, perms)])
    alphas, alphas_permuted = solve(grams), solve(permuted)
    for m, p, a, b in zip(grams, perms, alphas, alphas_permuted):
        unpermuted = np.empty_like(b)
        unpermuted[p] = b
        assert relative_gap(m, a, dtype) <= TARGET[dtype]
        assert relative_gap(m, unpermuted, dtype) <= TARGET[dtype]
        if family == "random":  # unique optimum: the weights agree too
            np.testing.assert_allclose(unpermuted, a, atol=1e3 * EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_scale_invariance(dtype):
    grams = np.concatenate(
        [make_grams(f, 8, dtype, count=c, seed=6) for f, c in (("random", 3), ("low_rank", 3), ("mixed_scales", 2))]
    )
    grams = grams / np.max(np.diagonal(grams, axis1=-2, axis2=-1), axis=-1)[:, None, None]
    base = solve(grams)
    # Powers of two: the internal rescaling is exact, so bit-identical (not
    # for mixed scales in float32, whose tiny entries underflow when scaled).
    exact = slice(None) if dtype == "float64" else slice(0, 6)
    for exponent in (-66, -20, 33, 99):
        scaled = (grams * np.ldexp(1.0, exponent)).astype(dtype)
        np.testing.assert_array_equal(solve(scaled)[exact], base[exact])
    # Any factor from 1e-20 to 1e30: the same objective.
    for factor in (1e-20, 3e-7, 7.0, 1e15, 1e30):
        alphas = solve((grams * factor).astype(dtype))
        for m, a in zip(grams, alphas):
            assert relative_gap(m, a, dtype) <= TARGET[dtype]


# ---------------------------------------------------- degenerate and edges


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_single_task(dtype):
    np.testing.assert_array_equal(solve(np.array([[2.0]], dtype)), [1.0])
    np.testing.assert_array_equal(solve(np.array([[0.0]], dtype)), [1.0])
    np.testing.assert_array_equal(solve(np.array([[3.0]], dtype), mask=np.array([False])), [1.0])
    assert np.all(np.isnan(solve(np.array([[np.nan]], dtype))))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_identical_and_opposite_gradients(dtype):
    rng = np.random.default_rng(19)
    grams = []
    for _ in range(4):  # all eight gradients identical: every alpha is optimal
        g = rng.standard_normal(5)
        grams.append(np.full((8, 8), g @ g))
    for _ in range(4):  # two opposite gradients among others: f* = 0
        g = rng.integers(-4, 5, size=(8, 5)).astype(float)
        g[rng.integers(1, 8)] = -g[0]
        grams.append(g @ g.T)
    grams = np.stack(grams).astype(dtype)
    alphas = solve(grams)
    assert np.all(alphas >= 0)
    np.testing.assert_allclose(alphas.sum(-1), 1.0, rtol=1e-6)
    for gram, alpha in zip(grams[4:], alphas[4:]):
        value = objective(gram.astype(np.float64), alpha.astype(np.float64))
        assert value <= TARGET[dtype] * EPS[dtype] * np.max(np.diag(gram))
    opposite = np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]])
    np.testing.assert_array_equal(solve((opposite @ opposite.T).astype(dtype)), [0.5, 0.5])


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_zero_tiny_and_huge_inputs(dtype):
    huge = 1e300 if dtype == "float64" else 1e36
    tiny = 1e-300 if dtype == "float64" else 1e-30
    grams = make_grams("random", 8, "float64", BATCH, seed=7)
    grams /= np.max(grams, axis=(-2, -1), keepdims=True)
    grams[:3] *= huge
    grams[3:6] *= tiny
    grams[6] = 0.0
    grams = grams.astype(dtype)
    alphas = solve(grams)
    assert np.all(np.isfinite(alphas)) and np.all(alphas >= 0)
    np.testing.assert_allclose(alphas.sum(-1), 1.0, rtol=1e-6)
    for gram, alpha in zip(grams, alphas):
        assert relative_gap(gram, alpha, dtype) <= TARGET[dtype]
    np.testing.assert_array_equal(np.isfinite(solve(np.zeros((2, 2), dtype))), True)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_non_finite_input_gives_nan_weights_and_returns(dtype):
    grams = make_grams("random", 8, dtype, BATCH, seed=8)
    grams[1, 2, 3] = grams[1, 3, 2] = np.nan
    grams[2, 0, 0] = np.inf
    grams[5] = -np.inf
    alphas = solve(grams)  # returns (the loops are capped)
    assert np.all(np.isnan(alphas[[1, 2, 5]]))
    finite = [0, 3, 4, 6, 7]
    assert np.all(np.isfinite(alphas[finite]))
    for gram, alpha in zip(grams[finite], alphas[finite]):
        assert relative_gap(gram, alpha, dtype) <= TARGET[dtype]


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_mask(dtype):
    grams = make_grams("random", 8, dtype, BATCH, seed=9)
    masks = np.random.default_rng(10).random((BATCH, 8)) < 0.6
    masks[:, 0] = True
    masks[3] = [False, True, False, False, False, False, False, False]
    alphas = solve(grams, mask=masks)
    for gram, mask, alpha in zip(grams, masks, alphas):
        assert np.all(alpha[~mask] == 0.0)  # exactly zero
        assert relative_gap(gram[np.ix_(mask, mask)], alpha[mask], dtype) <= TARGET[dtype]
    np.testing.assert_array_equal(alphas[3], [0, 1, 0, 0, 0, 0, 0, 0])
    # A mask without batch dimensions applies to every problem.
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    grams = np.stack([g @ g.T] * 3).astype(dtype)
    np.testing.assert_array_equal(solve(grams, mask=np.array([False, True])), [[0, 1]] * 3)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_masked_zero_gradient_does_not_win(dtype):
    g = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    grams = np.stack([g @ g.T] * BATCH).astype(dtype)
    np.testing.assert_array_equal(solve(grams)[0], [0.0, 1.0, 0.0])  # zero gradient wins
    alpha = solve(grams, mask=np.diagonal(grams, axis1=-2, axis2=-1) > 0)[0]
    np.testing.assert_allclose(alpha, [0.8, 0.0, 0.2], rtol=1e-6)
    assert alpha[1] == 0.0


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_all_masked_gives_uniform(dtype):
    grams = make_grams("random", 8, dtype, BATCH, seed=11)
    grams[1] = 0.0
    masks = np.ones((BATCH, 8), bool)
    masks[:2] = False
    alphas = solve(grams, mask=masks)
    np.testing.assert_array_equal(alphas[:2], np.full((2, 8), 0.125, dtype))
    np.testing.assert_array_equal(solve(np.eye(1, dtype=dtype), mask=np.zeros(1, bool)), [1.0])


# -------------------------------------------------------------- batching, jit


def test_batched_equals_per_element():
    dtype = "float64"
    grams = np.concatenate(
        [make_grams(f, 8, dtype, count=2, seed=12) for f in ("random", "low_rank", "identical")]
    ).reshape(2, 3, 8, 8)
    batched = solve(grams)
    assert batched.shape == (2, 3, 8)
    for index in np.ndindex(2, 3):
        single = solve(grams[index])
        assert single.shape == (8,)
        np.testing.assert_allclose(batched[index], single, rtol=0, atol=10 * EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_works_under_jit(dtype):
    """Inside a compiled "training step": gradients -> Gram -> weights."""
    rng = np.random.default_rng(13)
    vectors = (rng.standard_normal(16) + rng.standard_normal((BATCH, 8, 16))).astype(dtype)
    mask = np.ones((BATCH, 8), bool)
    mask[1, 2] = False

    def step(v, k):
        alpha = solvers.min_norm_from_vectors(v, mask=k)
        return ops.einsum("bt,btd->bd", alpha, v), alpha

    if BACKEND not in ("jax", "tensorflow"):
        pytest.skip(f"no graph compilation to test on {BACKEND}")
    if BACKEND == "jax" and dtype == "float64":
        pytest.skip("every other test already runs under jax.jit")
    with dtype_support(dtype):
        _, alphas = compiled(step)(vectors, mask)  # jax.jit / tf.function
        alphas = np.asarray(ops.convert_to_numpy(alphas))
        if BACKEND == "tensorflow":
            import tensorflow as tf

            _, eager = step(vectors, mask)
            np.testing.assert_allclose(alphas, eager.numpy(), atol=100 * EPS[dtype])
            _, xla = tf.function(step, jit_compile=True)(vectors, mask)
            np.testing.assert_allclose(alphas, xla.numpy(), atol=100 * EPS[dtype])
    assert alphas.dtype == np.dtype(dtype) and alphas[1, 2] == 0.0
    grams = np.einsum("bid,bjd->bij", vectors.astype(np.float64), vectors.astype(np.float64))
    for gram, m, alpha in zip(grams, mask, alphas):
        assert relative_gap(gram[np.ix_(m, m)], alpha[m], dtype) <= TARGET[dtype]


@ON_EVERY_BACKEND
def test_tensorflow_unknown_batch_size():
    if BACKEND != "tensorflow":
        pytest.skip("tf.function input signatures are TensorFlow only")
    import tensorflow as tf

    compiled = tf.function(
        solvers.min_norm, input_signature=[tf.TensorSpec([None, 8, 8], tf.float32)]
    )
    grams = make_grams("random", 8, "float32", BATCH, seed=14)
    np.testing.assert_allclose(compiled(tf.constant(grams)).numpy(), solve(grams), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_min_norm_from_vectors(dtype):
    vectors = np.random.default_rng(15).standard_normal((BATCH, 3, 9)).astype(dtype)
    with dtype_support(dtype):
        alpha = compiled(solvers.min_norm_from_vectors)(vectors)
        alpha = np.asarray(ops.convert_to_numpy(alpha))
    assert alpha.dtype == np.dtype(dtype)
    grams = np.einsum("bid,bjd->bij", vectors, vectors)
    np.testing.assert_allclose(alpha, solve(grams), atol=1e3 * EPS[dtype])


def test_frank_wolfe_warm_start_gives_the_same_answer():
    """max_iters only trades Frank-Wolfe steps for polish rounds."""
    dtype = "float64"
    grams = np.concatenate(
        [make_grams(f, 8, dtype, count=2, seed=16) for f in ("random", "correlated", "low_rank", "identical")]
    )
    for gram, alpha in zip(grams, solve(grams, frank_wolfe=True)):
        assert relative_gap(gram, alpha, dtype) <= TARGET[dtype]


# ----------------------------------------------------------- normalisation


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_normalization_divisors(dtype):
    g = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    gram = np.stack([g @ g.T, 4 * g @ g.T]).astype(dtype)
    losses = np.array([[2.0, 0.5, -3.0], [0.0, 1.0, 1.0]], dtype)
    eps = 1e-12

    def divisors(mode, **kw):
        with dtype_support(dtype):
            out = solvers.normalization_divisors(gram, losses, mode, **kw)
            return np.asarray(ops.convert_to_numpy(out))

    norms = np.array([[5.0, 0.0, 1.0], [10.0, 0.0, 2.0]])
    expected = {
        "l2": norms,
        "loss": np.abs(losses),
        "loss+": np.abs(losses) * norms,
        "none": np.ones((2, 3)),
    }
    for mode, values in expected.items():
        out = divisors(mode)
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_allclose(out, np.maximum(values, eps), rtol=1e-6)
        assert np.all(out >= np.asarray(eps, dtype))  # epsilon guard
    np.testing.assert_allclose(divisors("l2", epsilon=0.5), np.maximum(norms, 0.5), rtol=1e-6)
    assert set(expected) == set(solvers.NORMALIZATIONS)


def test_unknown_normalization_raises():
    with pytest.raises(ValueError, match="l2.*loss.*loss\\+.*none"):
        solvers.normalization_divisors(np.eye(2), np.ones(2), "L2")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_normalize_gram(dtype):
    rng = np.random.default_rng(17)
    g = rng.standard_normal((4, 6))
    n = rng.uniform(0.5, 3.0, size=4)
    with dtype_support(dtype):
        out = solvers.normalize_gram((g @ g.T).astype(dtype), n.astype(dtype))
        out = np.asarray(ops.convert_to_numpy(out))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, (g / n[:, None]) @ (g / n[:, None]).T, rtol=1e-5)
    # With l2 divisors the normalised gradients have unit norm.
    with dtype_support(dtype):
        gram = (g @ g.T).astype(dtype)
        unit = solvers.normalize_gram(gram, solvers.normalization_divisors(gram, np.ones(4), "l2"))
        np.testing.assert_allclose(np.diag(ops.convert_to_numpy(unit)), 1.0, rtol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_direct_torch_namespace_gives_the_same_weights(dtype):
    """The torch step runs the solver on direct torch calls; it must be the
    same computation as through keras.ops, bit for bit, including masks,
    non-finite input, batches and normalisations."""
    from keras_mgda.backend import torch_ops

    rng = np.random.default_rng(11)
    cases = []
    for family in FAMILIES:
        for num_tasks in (1, 2, 3, 8, 40):
            grams = make_grams(family, num_tasks, dtype, 2, seed=num_tasks)
            mask = rng.uniform(size=grams.shape[:-1]) > 0.25
            cases.append((grams, mask))
    bad = make_grams("random", 5, dtype, 2)
    bad[1, 2, 3] = np.nan
    cases.append((bad, None))
    for grams, mask in cases:
        losses = ops.convert_to_tensor(
            rng.uniform(0.1, 3.0, size=grams.shape[:-1]).astype(dtype)
        )
        grams = ops.convert_to_tensor(grams)
        mask = None if mask is None else ops.convert_to_tensor(mask)

        def run(namespace, grams=grams, losses=losses, mask=mask):
            divisors = solvers.normalization_divisors(grams, losses, "loss+", ops=namespace)
            normalized = solvers.normalize_gram(grams, divisors, ops=namespace)
            return ops.convert_to_numpy(solvers.min_norm(normalized, mask=mask, ops=namespace))

        expected = run(ops)
        got = run(torch_ops)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


# Families whose optimum alpha is unique: there the NumPy solve must return
# the same weights as keras.ops, not only an equally good point.
UNIQUE_FAMILIES = ("random", "correlated", "orthogonal", "opposite", "zero_gradient")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("family", FAMILIES + ["conflicting"])
def test_numpy_namespace_is_as_exact(dtype, family):
    """The eager torch step solves MGDA's problem on the host, with
    `ops=numpy_ops`: the same code on NumPy arrays must
    meet the same accuracy targets, keep the dtype and the masks, and give
    keras.ops's weights wherever the optimum is unique."""
    from keras_mgda.backend import numpy_ops

    rng = np.random.default_rng(5)
    for num_tasks in SIZES:
        grams = make_grams(family, num_tasks, dtype, BATCH)
        mask = rng.uniform(size=grams.shape[:-1]) > 0.25
        with np.errstate(all="ignore"):
            alphas = solvers.min_norm(grams, ops=numpy_ops)
            masked = solvers.min_norm(grams, mask=mask, ops=numpy_ops)
        assert type(alphas) is np.ndarray and alphas.dtype == np.dtype(dtype)
        assert np.all(alphas >= 0)
        np.testing.assert_allclose(alphas.sum(-1), 1.0, atol=4 * num_tasks * EPS[dtype])
        bound = 1.0 if family == "conflicting" else TARGET[dtype]
        for gram, alpha in zip(grams, alphas):
            assert relative_gap(gram, alpha, dtype) <= bound, (num_tasks, alpha)
            if family not in ("mixed_scales", "conflicting"):
                assert kkt_violation(gram, alpha) <= 1e3 * EPS[dtype]
        assert np.all(masked[~mask] == 0)
        for gram, alpha, keep in zip(grams, masked, mask):
            if keep.any():
                sub = gram[np.ix_(keep, keep)]
                assert relative_gap(sub, alpha[keep], dtype) <= bound
        if family in UNIQUE_FAMILIES:
            expected = solve(grams)
            tolerance = 1e3 * EPS[dtype]
            np.testing.assert_allclose(alphas, expected, atol=tolerance, rtol=0)


def test_numpy_namespace_non_finite_input_gives_nan_weights():
    from keras_mgda.backend import numpy_ops

    grams = make_grams("random", 5, "float32", 2)
    grams[1, 2, 3] = np.inf
    with np.errstate(all="ignore"):
        alphas = solvers.min_norm(grams, ops=numpy_ops)
    assert np.all(np.isfinite(alphas[0])) and np.all(np.isnan(alphas[1]))
