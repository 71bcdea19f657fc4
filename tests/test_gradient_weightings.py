"""Property tests of the Gram-matrix weightings (PCGrad, CAGrad, IMTL-G,
Nash-MTL, Aligned-MTL, UPGrad), on whichever Keras backend is active
(KERAS_BACKEND=tensorflow|jax|torch), in the style of torchjd's aggregator
tests: each method is called on Gram matrices M = G G^T of random task
gradients G (float64 numpy, rounded to float32 as the model would pass
them), and what the method guarantees is checked in float64 on the float32
weights:

- PCGrad: the hand-computed surgery; no projection conflicts with its
  task for T = 2; no conflicts, all weights 1.
- UPGrad: the KKT conditions of every projection (w >= e_i, M w >= 0,
  complementarity), so M w >= 0 for the mean.
- CAGrad: the optimality conditions of max_d min_i g_i . d over the ball
  ||d - g0|| <= c ||g0||.
- IMTL-G: equal projections on the unit gradients, weights summing to 1.
- Nash-MTL: alpha_t (M alpha)_t = 1.
- Aligned-MTL: B M B = lambda_min I (orthogonal balanced gradients of equal
  norm), and the weights B 1 against a float64 eigendecomposition.

and for all of them: task order, scale, zero / huge / rank-deficient /
non-finite Gram matrices, T = 1, configs, and compilation (jax.jit,
tf.function with XLA).
"""

import itertools
import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_mgda import weighting as weighting_lib
from keras_mgda.weighting import aligned_mtl
from keras_mgda.weighting import pcgrad
from keras_mgda.weighting import upgrad
from keras_mgda.weighting.aligned_mtl import AlignedMTL
from keras_mgda.weighting.cagrad import CAGrad
from keras_mgda.weighting.imtl import IMTLG
from keras_mgda.weighting.nash_mtl import NashMTL
from keras_mgda.weighting.pcgrad import PCGrad
from keras_mgda.weighting.upgrad import UPGrad

BACKEND = keras.backend.backend()
CLASSES = [PCGrad, CAGrad, IMTLG, NashMTL, AlignedMTL, UPGrad]
TASKS = [1, 2, 3, 10, 40]
SEEDS = {1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2], 10: [0, 1], 40: [0]}
CASES = [(t, s) for t in TASKS for s in SEEDS[t]]
# Worst values seen in the property tests, printed at the end (pytest -s).
MEASURED = {}


def measure(name, value):
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(value))


# The torch step solves `host_solvable` methods on NumPy arrays
# (`numpy_ops`): on torch, every test runs a second time with `weigh`
# taking that path, so the NumPy solve is held to the same properties.
ENGINES = ["keras", "numpy"] if BACKEND == "torch" else ["keras"]
ENGINE = "keras"


def _solves_on_host(weighting):
    # The torch step's own rule, so the tests take the path it takes.
    return weighting.solvable_on_host


@pytest.fixture(autouse=True, params=ENGINES)
def engine(request):
    global ENGINE
    ENGINE = request.param
    yield request.param
    ENGINE = "keras"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if MEASURED:
        print("\nworst measured: " + ", ".join(f"{k}={v:.2e}" for k, v in sorted(MEASURED.items())))


# ---------------------------------------------------------------- calling


_COMPILED = {}
# Cheaper XLA compilation for the many small jitted functions (JAX).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _key(weighting, num_tasks, xla):
    config = json.dumps(weighting.get_config(), sort_keys=True, default=str)
    owner = id(weighting) if weighting.variables and BACKEND == "tensorflow" else None
    return (type(weighting).__name__, config, num_tasks, xla, owner)


def _compile(weighting, xla):
    """`weighting.__call__` compiled once per config and T: jax.jit (its
    variables, PCGrad's seed, carried through a StatelessScope, as in the
    model's JAX step) or tf.function; plain calls on torch."""
    if BACKEND == "jax":
        import jax

        def stateless(values, losses, gram):
            mapping = list(zip(weighting.variables, values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                weights = weighting(losses, gram)
            return weights, [scope.get_current_value(v) for v in weighting.variables]

        options = {} if xla else {"compiler_options": FAST_COMPILE}
        compiled = jax.jit(stateless, **options)

        def call(w, losses, gram):
            weights, values = compiled([v.value for v in w.variables], losses, gram)
            for variable, value in zip(w.variables, values):
                variable.assign(value)
            return weights

        return call
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # Closes over this instance (its variables, for PCGrad's seed: then
        # the cache is per instance); equal configs weigh alike otherwise.
        compiled = tf.function(weighting.__call__, jit_compile=xla)
        return lambda w, losses, gram: compiled(losses, gram)
    return lambda w, losses, gram: w(losses, gram)


def weigh(weighting, gram, losses=None, xla=False, namespace=None):
    """The weighting's float32 weights for a numpy Gram matrix, as numpy;
    with `namespace` (eager torch), computed with that array namespace."""
    gram = np.asarray(gram, np.float32)
    num_tasks = gram.shape[-1]
    if losses is None:
        losses = np.ones(num_tasks, np.float32)
    if namespace is not None:
        tensor = namespace.convert_to_tensor
        weights = weighting(tensor(np.asarray(losses, np.float32)), tensor(gram), ops=namespace)
        return np.asarray(ops.convert_to_numpy(weights))
    if ENGINE == "numpy" and _solves_on_host(weighting):
        from keras_mgda.backend import numpy_ops

        with np.errstate(all="ignore"):
            weights = weighting(np.asarray(losses, np.float32), gram, ops=numpy_ops)
        assert type(weights) is np.ndarray, type(weights)
        assert weights.shape == (num_tasks,) and weights.dtype == np.float32
        return weights
    key = _key(weighting, num_tasks, xla)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(weighting, xla)
    weights = _COMPILED[key](weighting, np.asarray(losses, np.float32), gram)
    weights = np.asarray(ops.convert_to_numpy(weights))
    assert weights.shape == (num_tasks,) and weights.dtype == np.float32
    return weights


# --------------------------------------------------------------- problems


def gradients(family, num_tasks, seed):
    """(T, D) float64 task gradients, exactly representable in float32.

    aligned: a shared direction plus noise (few conflicts); random:
    independent directions with norms from 0.1 to 10 (many conflicts),
    linearly independent; mixed: the same with norms from 1e-4 to 1e4;
    low_rank: D = max(1, T // 3) < T for T > 1.
    """
    rng = np.random.default_rng([seed, num_tasks, len(family)])
    if family == "low_rank":
        dim = max(1, num_tasks // 3)
    else:
        dim = 2 * num_tasks + 3
    if family == "aligned":
        g = 1.0 + 0.6 * rng.standard_normal((num_tasks, dim))
    else:
        g = rng.standard_normal((num_tasks, dim))
        spread = np.log(1e4) if family == "mixed" else np.log(10.0)
        g *= np.exp(rng.uniform(-spread, spread, size=(num_tasks, 1)))
    return g.astype(np.float32).astype(np.float64)


def gram_of(g):
    """The float32 Gram matrix (what the model passes), as float64."""
    return (g @ g.T).astype(np.float32).astype(np.float64)


def permuted(gram, perm):
    return gram[np.ix_(perm, perm)]


# ------------------------------------------------------------- interface


OPTIONS = {
    PCGrad: {"mode": "parameters", "head_update": "scaled", "seed": 7},
    CAGrad: {"c": 0.25, "rescale": 2, "mode": "parameters", "head_update": "scaled"},
    IMTLG: {"mode": "parameters", "head_update": "scaled"},
    NashMTL: {"max_norm": 2.0, "mode": "parameters", "head_update": "full", "max_iters": 20, "epsilon": 1e-5},
    AlignedMTL: {"scale_mode": "median", "mode": "parameters", "head_update": "scaled"},
    UPGrad: {"mode": "parameters", "head_update": "scaled", "max_rounds": 30},
}
DEFAULT_HEADS = {PCGrad: "full", CAGrad: "full", IMTLG: "full", NashMTL: "scaled", AlignedMTL: "full", UPGrad: "full"}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_round_trip(cls):
    for options in ({}, OPTIONS[cls]):
        weighting = cls(**options)
        config = weighting.get_config()
        for name, value in options.items():
            assert config[name] == value
        clone = cls.from_config(config)
        assert type(clone) is cls and clone.get_config() == config
        restored = weighting_lib.get(keras.saving.serialize_keras_object(weighting))
        assert type(restored) is cls and restored.get_config() == config
        assert repr(weighting).startswith(cls.__name__ + "(")
    assert cls.requires_gram
    default = cls()
    assert default.gradient_space == "representation" and default.mode == "representation"
    assert cls(mode="parameters").gradient_space == "parameters"
    assert default.head_update == DEFAULT_HEADS[cls]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_invalid_options_raise(cls):
    with pytest.raises(ValueError, match="representation"):
        cls(mode="shared")
    with pytest.raises(ValueError, match="full"):
        cls(head_update="half")


def test_method_specific_options_raise():
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="c must be"):
        CAGrad(c=-1.0)
    with pytest.raises(ValueError, match="min"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="epsilon"):
        NashMTL(epsilon=0.0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_head_weights(cls):
    weights = ops.convert_to_tensor(np.array([0.5, 2.0, 3.0], np.float32))
    for head_update in ("full", "scaled"):
        out = np.asarray(ops.convert_to_numpy(cls(head_update=head_update).head_weights(weights)))
        if head_update == "full":
            np.testing.assert_array_equal(out, [1.0, 1.0, 1.0])
        elif cls is NashMTL:  # the unclipped alpha: weights / min(1, 1 / sqrt(3))
            np.testing.assert_allclose(out, np.array([0.5, 2.0, 3.0]) * np.sqrt(3.0), rtol=1e-6)
        else:
            np.testing.assert_array_equal(out, [0.5, 2.0, 3.0])


# ----------------------------------------------------------------- PCGrad


def reference_surgery(g, order):
    """PCGrad on explicit vectors (the paper's Algorithm 1, one order)."""
    projected = g.copy()
    for i in range(len(g)):
        for j in order:
            if j == i:
                continue
            dot = projected[i] @ g[j]
            if dot < 0:
                projected[i] -= dot / (g[j] @ g[j]) * g[j]
    return projected.sum(axis=0)


def first_order(seed, num_tasks):
    """The task order of a fresh PCGrad(seed=seed)'s first step."""
    generator = keras.random.SeedGenerator(seed)
    order = keras.random.shuffle(ops.arange(num_tasks, dtype="int32"), seed=generator)
    return np.asarray(ops.convert_to_numpy(order))


@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_pcgrad_is_the_surgery(num_tasks, seed):
    g = gradients("random", num_tasks, seed)
    gram = gram_of(g)
    weights = weigh(make(PCGrad), gram).astype(np.float64)
    order = first_order(5, num_tasks)
    assert sorted(order) == list(range(num_tasks))
    expected = reference_surgery(g, order)
    error = np.linalg.norm(g.T @ weights - expected) / np.linalg.norm(np.abs(g).sum(0))
    measure("pcgrad_vs_surgery", error)
    assert error <= 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_pcgrad_two_conflicting_tasks(seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((2, 4))
    if g[0] @ g[1] > 0:
        g[1] = -g[1]
    g = g.astype(np.float32).astype(np.float64)
    gram = gram_of(g)
    weights = weigh(make(PCGrad), gram).astype(np.float64)
    d = g.T @ weights
    # Hand-computed: each gradient loses its component along the other.
    expected = (g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]) + (g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0])
    np.testing.assert_allclose(d, expected, atol=1e-5 * np.abs(g).max())
    # Neither projected gradient conflicts with the other task: the sum
    # improves both tasks (to first order).
    assert np.all(g @ d >= -1e-5 * np.linalg.norm(g, axis=1) * np.linalg.norm(d))


@pytest.mark.parametrize("num_tasks", TASKS)
def test_pcgrad_without_conflicts_sums_the_gradients(num_tasks):
    g = np.abs(gradients("aligned", num_tasks, 0))  # pairwise dot products > 0
    np.testing.assert_array_equal(weigh(make(PCGrad), gram_of(g)), np.ones(num_tasks))


def test_pcgrad_order_is_random_and_seeded():
    gram = gram_of(gradients("random", 10, 3))
    first = make(PCGrad)
    draws = [weigh(first, gram) for _ in range(4)]
    assert len({d.tobytes() for d in draws}) > 1  # a new order every step
    np.testing.assert_array_equal(weigh(make(PCGrad), gram), draws[0])  # same seed, same orders
    direct = np.asarray(ops.convert_to_numpy(pcgrad.surgery(gram.astype(np.float32), first_order(5, 10))))
    np.testing.assert_allclose(draws[0], direct, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- UPGrad


def kkt_residual(gram, weights, lower):
    """Worst natural KKT residual of min w^T M w s.t. w >= lower, per row:
    min((w - u)_j / max|w|, (M w)_j / (|M| |w|)_j), which is 0 exactly at
    the optimum (free: gradient 0; bound: gradient >= 0)."""
    worst = 0.0
    for w, u in zip(weights, lower):
        grad = gram @ w
        noise = np.abs(gram) @ np.abs(w)
        relative = np.where(noise > 0, grad / np.where(noise > 0, noise, 1.0), 0.0)
        residual = np.minimum((w - u) / np.abs(w).max(), relative)
        worst = max(worst, np.abs(residual).max())
    return worst


@pytest.mark.parametrize("family", ["random", "aligned", "mixed", "low_rank"])
@pytest.mark.parametrize("num_tasks,seed", [c for c in CASES if c[0] in (3, 40)])
def test_upgrad_projections_satisfy_kkt(family, num_tasks, seed):
    gram = gram_of(gradients(family, num_tasks, seed))
    unit = (gram / np.max(np.diag(gram))).astype(np.float32)
    lower = np.eye(num_tasks, dtype=np.float32)
    projections = compiled_projection(num_tasks)(unit, lower)
    projections = np.asarray(ops.convert_to_numpy(projections), np.float64)
    residual = kkt_residual(unit.astype(np.float64), projections, np.eye(num_tasks))
    measure("upgrad_kkt", residual)
    assert residual <= 1e-5
    weights = weigh(UPGrad(), gram).astype(np.float64)
    # The same direction as the mean projection (weights are not unique for
    # rank-deficient M): |G^T (w - mean)| small.
    difference = weights - projections.mean(0)
    assert difference @ gram @ difference <= 1e-8 * max(weights @ gram @ weights, np.max(np.diag(gram)) * 1e-6)


@pytest.mark.parametrize("family", ["random", "aligned", "mixed", "low_rank"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_upgrad_does_not_conflict(family, num_tasks, seed):
    """The mean of vectors in the dual cone is in the dual cone: M w >= 0,
    no task's loss increases to first order."""
    gram = gram_of(gradients(family, num_tasks, seed))
    weights = weigh(UPGrad(), gram).astype(np.float64)
    conflict = np.min(gram @ weights / (np.abs(gram) @ np.abs(weights)))
    measure("upgrad_min_Mw", max(-conflict, 0.0))
    assert conflict >= -1e-5


def compiled_projection(num_tasks):
    return compiled_function(upgrad.project_onto_dual_cone, num_tasks)


def compiled_function(function, num_tasks):
    """A module function compiled once per T (jax.jit / tf.function)."""
    key = (function.__name__, num_tasks)
    if key not in _COMPILED:
        if BACKEND == "jax":
            import jax

            function = jax.jit(function, compiler_options=FAST_COMPILE)
        elif BACKEND == "tensorflow":
            import tensorflow as tf

            function = tf.function(function)
        _COMPILED[key] = function
    return _COMPILED[key]


@pytest.mark.parametrize("num_tasks", TASKS)
def test_upgrad_without_conflicts_is_the_mean(num_tasks):
    g = np.abs(gradients("aligned", num_tasks, 1))
    np.testing.assert_allclose(weigh(UPGrad(), gram_of(g)), np.full(num_tasks, 1.0 / num_tasks), rtol=1e-7)


def test_upgrad_two_opposite_gradients():
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])
    np.testing.assert_allclose(gram_of(g) @ weigh(UPGrad(), gram_of(g)), 0.0, atol=1e-5)


# ----------------------------------------------------------------- CAGrad


def cagrad_check(gram, weights, c, tol=1e-4):
    """Optimality of CAGrad's d = sum_t alpha_t g_t with alpha = weights / T
    (rescale=0): d = g0 + r u, u = G^T v / ||G^T v||, v >= 0 supported on
    the tasks of least improvement g_i . d. Returns (ball, spread)."""
    num_tasks = len(gram)
    alpha = weights / num_tasks
    radius = c * np.sqrt(np.mean(gram))
    v = alpha - 1.0 / num_tasks
    assert np.all(v >= -1e-6 * np.abs(v).max())
    step = np.sqrt(max(v @ gram @ v, 0.0))
    improvement = gram @ alpha
    scale = np.sqrt(np.max(np.diag(gram)) * max(alpha @ gram @ alpha, 0.0))
    support = v > 1e-3 * np.abs(v).max()
    spread = (improvement[support].max() - improvement[support].min()) / scale
    below = (improvement[support].min() - improvement.min()) / scale
    # At least as good for the worst task as the average gradient g0; for
    # c >= 1 the ball holds d = 0, so no task gets worse (M alpha >= 0).
    assert improvement.min() >= np.min(gram.mean(1)) - tol * scale
    if c >= 1:
        assert improvement.min() >= -tol * scale
    return abs(step / radius - 1.0), max(spread, below)


@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_cagrad_is_optimal(family, num_tasks, seed):
    gram = gram_of(gradients(family, num_tasks, seed))
    # The default c = 0.4 (rescale=1 divides by 1 + c^2) everywhere, and a
    # large c where T = 10 (each option is compiled anew).
    cs = (0.4, 2.0) if num_tasks == 10 else (0.4,)
    for c in cs:
        weights = weigh(CAGrad(c=c, rescale=0) if c != 0.4 else CAGrad(), gram).astype(np.float64)
        if c == 0.4:
            weights *= 1.16
        ball, spread = cagrad_check(gram, weights, c)
        measure("cagrad_ball", ball)
        measure("cagrad_support_spread", spread)
        assert ball <= 1e-4 and spread <= 1e-4


def test_cagrad_options():
    """One task: d = g + c g, divided by 1 + c^2 (default), 1 + c or 1."""
    gram = [[9.0]]
    np.testing.assert_allclose(weigh(CAGrad(), gram), [1.4 / 1.16], rtol=1e-6)
    np.testing.assert_allclose(weigh(CAGrad(rescale=2), gram), [1.0], rtol=1e-6)
    np.testing.assert_allclose(weigh(CAGrad(c=2.0, rescale=0), gram), [3.0], rtol=1e-6)
    np.testing.assert_array_equal(weigh(CAGrad(c=0.0), gram), [1.0])  # the mean gradient


@pytest.mark.parametrize("num_tasks", [10])
def test_cagrad_rank_deficient(num_tasks):
    """The origin may be in the hull of the gradients (g_w = 0, no regular
    dual solution): the update stays inside the ball (to the ~1% float32
    resolves) with moderate weights."""
    for c in (0.4, 2.0):  # (c = 2: the ball holds the origin, d ~ 0 is optimal)
        for seed in range(2):
            gram = gram_of(gradients("low_rank", num_tasks, seed))
            weights = weigh(CAGrad(c=c, rescale=0) if c != 0.4 else CAGrad(), gram).astype(np.float64)
            weights *= 1.16 if c == 0.4 else 1.0
            v = weights / num_tasks - 1.0 / num_tasks
            radius = c * np.sqrt(np.mean(gram))
            assert np.all(np.isfinite(weights)) and np.all(v >= -1e-6 * np.abs(v).max())
            outside = np.sqrt(max(v @ gram @ v, 0.0)) / radius - 1.0
            measure("cagrad_rank_deficient_outside", max(outside, 0.0))
            assert outside <= 0.02
            scale = np.sqrt(np.diag(gram))
            assert np.abs(v) @ scale <= 32 * radius * (1 + 1e-4)  # the cap


# ----------------------------------------------------------------- IMTL-G


@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_imtl_equal_projections(family, num_tasks, seed):
    gram = gram_of(gradients(family, num_tasks, seed))
    alpha = weigh(IMTLG(), gram).astype(np.float64)
    np.testing.assert_allclose(abs(alpha.sum()), 1.0, rtol=1e-5)
    projections = gram @ alpha / np.sqrt(np.diag(gram))
    scale = np.sqrt(max(alpha @ gram @ alpha, 0.0))
    spread = np.ptp(projections) / scale
    measure(f"imtl_spread_{family}", spread)
    assert spread <= 1e-4
    # Equal and positive: every task improves at the same rate.
    assert projections.min() > 0
    if family == "aligned":  # (the closed form itself, summing to 1)
        np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-5)


def test_imtl_negative_common_projection_is_flipped():
    """Gradients (norms over 8 orders of magnitude) for which the closed
    form with sum(alpha) = 1 increases every loss: the weights are negated."""
    found = 0
    for seed in range(200):
        g = gradients("mixed", 10, seed + 100)
        gram = gram_of(g)
        u = g / np.linalg.norm(g, axis=1, keepdims=True)
        beta = np.linalg.solve(u @ u.T, np.ones(10))  # C beta = 1 (c = 1)
        closed = beta / np.linalg.norm(g, axis=1)
        if closed.sum() > 0:
            continue
        found += 1  # normalised to sum 1, c = 1 / sum < 0
        alpha = weigh(IMTLG(), gram).astype(np.float64)
        np.testing.assert_allclose(alpha, -closed / closed.sum(), rtol=1e-3, atol=1e-6 * np.abs(alpha).max())
        assert np.all(gram @ alpha > 0)
        if found == 2:
            break
    assert found


def test_imtl_two_tasks_closed_form():
    """The paper's formula alpha_2 = g_1 U^T (D U^T)^-1 for T = 2."""
    g = np.array([[3.0, 0.0], [1.0, 2.0]])
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    a2 = (g[0] @ (u[0] - u[1])) / ((g[0] - g[1]) @ (u[0] - u[1]))
    np.testing.assert_allclose(weigh(IMTLG(), gram_of(g)), [1 - a2, a2], rtol=1e-5)


def test_imtl_zero_gradient_task_is_left_out():
    g = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    gram = gram_of(g)
    alpha = weigh(IMTLG(), gram).astype(np.float64)
    assert alpha[1] == 0.0
    projections = (gram @ alpha)[[0, 2]] / np.sqrt(np.diag(gram)[[0, 2]])
    np.testing.assert_allclose(projections[0], projections[1], rtol=1e-5)


# --------------------------------------------------------------- Nash-MTL


@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_nash_bargaining_solution(family, num_tasks, seed):
    gram = gram_of(gradients(family, num_tasks, seed))
    # The authors' clipping of the shared update to norm 1 is a factor.
    clip = min(1.0, 1.0 / np.sqrt(num_tasks))
    weights = weigh(NashMTL(), gram).astype(np.float64)
    alpha = weights / clip
    assert np.all(alpha > 0)
    residual = np.max(np.abs(alpha * (gram @ alpha) - 1.0))  # (M a)_t = 1 / a_t
    measure("nash_residual", residual)
    assert residual <= 1e-4
    np.testing.assert_allclose(alpha @ gram @ alpha, num_tasks, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(weights @ gram @ weights), min(np.sqrt(num_tasks), 1.0), rtol=1e-4)
    heads = np.asarray(ops.convert_to_numpy(NashMTL().head_weights(ops.convert_to_tensor(weights.astype(np.float32)))))
    np.testing.assert_allclose(heads, alpha, rtol=1e-6)


def test_nash_closed_forms():
    # Orthogonal gradients: alpha_t = 1 / ||g_t||.
    g = np.diag([1.0, 2.0, 4.0])
    np.testing.assert_allclose(weigh(NashMTL(max_norm=0), gram_of(g)), [1.0, 0.5, 0.25], rtol=1e-5)
    np.testing.assert_allclose(weigh(NashMTL(), gram_of(g)), np.array([1.0, 0.5, 0.25]) / np.sqrt(3), rtol=1e-5)
    # One task: the normalised gradient.
    np.testing.assert_allclose(weigh(NashMTL(), [[16.0]]), [0.25], rtol=1e-6)


def test_nash_scale_and_zero_task():
    gram = gram_of(gradients("random", 3, 0))
    base = weigh(NashMTL(), gram)
    for factor in (2.0**-40, 1e-20, 4.0, 1e30):
        np.testing.assert_allclose(weigh(NashMTL(), gram * factor) * np.sqrt(factor), base, rtol=1e-5)
    g = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(weigh(NashMTL(max_norm=0), gram_of(g)), [1.0, 0.0, 0.5], rtol=1e-5)


def test_nash_no_solution_stays_finite():
    """Opposite gradients: no direction helps both, f is unbounded; the
    ridge keeps alpha near 1 / sqrt(epsilon)."""
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])
    alpha = weigh(NashMTL(), gram_of(g)) * np.sqrt(2.0)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    assert np.max(alpha) <= 10.0 / np.sqrt(1e-6)


# ------------------------------------------------------------ Aligned-MTL


def reference_balance(gram, scale_mode="min"):
    values, vectors = np.linalg.eigh(gram)
    kept = values > values.max() * len(gram) * np.finfo(np.float32).eps
    values, vectors = values[kept], vectors[:, kept]
    scale = {
        "min": values.min(),
        "median": np.sort(values)[(len(values) - 1) // 2],
        "rmse": values.mean(),
    }[scale_mode]
    return np.sqrt(scale) * (vectors / np.sqrt(values)) @ vectors.T, values, scale


@pytest.mark.parametrize("family", ["aligned", "random"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_aligned_balanced_gradients_are_orthogonal(family, num_tasks, seed):
    g = gradients(family, num_tasks, seed)
    if family == "random":  # well-conditioned enough for float32 eigh
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    gram = gram_of(g)
    balance = compiled_function(_balance_min, num_tasks)(gram.astype(np.float32))
    balance = np.asarray(ops.convert_to_numpy(balance), np.float64)
    reference, values, _ = reference_balance(gram)
    balanced = balance @ gram @ balance  # Gram matrix of the rows of B G
    error = np.abs(balanced - values.min() * np.eye(num_tasks)).max() / values.min()
    measure("aligned_BMB", error)
    assert error <= 1e-3
    weights = weigh(AlignedMTL(), gram).astype(np.float64)
    np.testing.assert_allclose(weights, reference.sum(1), rtol=1e-3, atol=1e-4 * np.abs(reference.sum(1)).max())


def _balance_min(gram):
    return aligned_mtl.balance_transformation(gram, "min")


def _balance_median(gram):
    return aligned_mtl.balance_transformation(gram, "median")


def _balance_rmse(gram):
    return aligned_mtl.balance_transformation(gram, "rmse")


BALANCES = {"min": _balance_min, "median": _balance_median, "rmse": _balance_rmse}


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("num_tasks", [1, 2, 10])
def test_aligned_scale_modes_and_rank(scale_mode, num_tasks):
    for family in ("aligned", "low_rank"):
        gram = gram_of(gradients(family, num_tasks, 2))
        reference, values, scale = reference_balance(gram, scale_mode)
        weights = weigh(AlignedMTL(scale_mode=scale_mode), gram).astype(np.float64)
        expected = reference.sum(1)
        np.testing.assert_allclose(weights, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())
        # Rank R: B M B is the scale times the projector on the R kept directions.
        balance = compiled_function(BALANCES[scale_mode], num_tasks)(gram.astype(np.float32))
        balance = np.asarray(ops.convert_to_numpy(balance), np.float64)
        spectrum = np.linalg.eigvalsh(balance @ gram @ balance)
        assert np.sum(spectrum > 1e-3 * spectrum.max()) == len(values)
        np.testing.assert_allclose(spectrum[-len(values) :], scale, rtol=1e-3)


def test_aligned_orthogonal_equal_norms_give_ones():
    np.testing.assert_allclose(weigh(AlignedMTL(), 9.0 * np.eye(4)), np.ones(4), rtol=1e-6)


# ---------------------------------------------------------- all methods


_INSTANCES = {}


def make(cls):
    """The default instance of `cls` (PCGrad(seed=5)), shared so that it is
    compiled once per T; PCGrad's seed state is reset to its first step."""
    if cls not in _INSTANCES:
        weighting = cls(seed=5) if cls is PCGrad else cls()
        _INSTANCES[cls] = (weighting, [ops.convert_to_numpy(v.value) for v in weighting.variables])
    weighting, initial = _INSTANCES[cls]
    for variable, value in zip(weighting.variables, initial):
        variable.assign(value)
    return weighting


@pytest.mark.parametrize("num_tasks", [3, 10])
@pytest.mark.parametrize("cls", [c for c in CLASSES if c is not PCGrad], ids=lambda c: c.__name__)
def test_task_order_invariance(cls, num_tasks):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    perm = rng.permutation(num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks)
    weights = weigh(make(cls), gram, losses)
    weights_permuted = weigh(make(cls), permuted(gram, perm), losses[perm])
    np.testing.assert_allclose(weights_permuted, weights[perm], rtol=1e-4, atol=1e-5 * np.abs(weights).max())


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_scale(cls, num_tasks):
    """Every method but Nash-MTL is scale invariant, bit for bit under powers
    of two; Nash-MTL's alpha scales as 1 / sqrt(s)."""
    gram = gram_of(gradients("random", num_tasks, 8))
    base = weigh(make(cls), gram)
    for factor in (2.0**-60, 2.0**60, 1e-20, 3.0, 1e30):
        weights = weigh(make(cls), gram * factor)  # same seed: same order
        if cls is NashMTL:
            np.testing.assert_allclose(weights * np.sqrt(factor), base, rtol=1e-5)
        elif np.log2(factor) == np.round(np.log2(factor)):
            np.testing.assert_array_equal(weights, base)
        else:
            np.testing.assert_allclose(weights, base, rtol=1e-4, atol=1e-5 * np.abs(base).max())


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_degenerate_grams_give_finite_weights(cls, num_tasks):
    rng = np.random.default_rng(num_tasks)
    g = gradients("random", num_tasks, 9)
    duplicated = g.copy()
    duplicated[num_tasks // 2 :] = g[0]
    grams = {
        "zero": np.zeros((num_tasks, num_tasks)),
        "huge": gram_of(g) / np.abs(gram_of(g)).max() * 1e30,
        "rank_deficient": gram_of(gradients("low_rank", num_tasks, 9)),
        "duplicated": gram_of(duplicated),
        "mixed_scales": gram_of(g * np.exp(rng.uniform(-20, 20, size=(num_tasks, 1)))),
    }
    for name, gram in grams.items():
        weights = weigh(make(cls), gram)
        assert np.all(np.isfinite(weights)), name
    expected_zero = {
        PCGrad: 1.0, CAGrad: 1.0 / 1.16, IMTLG: 1.0 / num_tasks, NashMTL: 0.0,
        AlignedMTL: 1.0, UPGrad: 1.0 / num_tasks,
    }[cls]
    np.testing.assert_allclose(weigh(make(cls), grams["zero"]), expected_zero, rtol=1e-6)
    gram = gram_of(g)
    gram[0, -1] = gram[-1, 0] = np.nan
    assert np.all(np.isnan(weigh(make(cls), gram)))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_single_task(cls):
    expected = {PCGrad: 1.0, CAGrad: 1.4 / 1.16, IMTLG: 1.0, NashMTL: 0.5, AlignedMTL: 1.0, UPGrad: 1.0}[cls]
    np.testing.assert_allclose(weigh(make(cls), [[4.0]]), [expected], rtol=1e-5)


XLA_CASES = [pytest.param(c, marks=pytest.mark.slow) if c is CAGrad else c for c in CLASSES]


@pytest.mark.parametrize("cls", XLA_CASES, ids=lambda c: c.__name__)
def test_compiles_with_xla(cls):
    """tf.function(jit_compile=True) gives the weights of tf.function. (On
    JAX every test here runs under jax.jit already. CAGrad's XLA compilation
    takes ~6 s: run it with -m slow.)"""
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit")
    g = gradients("random", 3, 4)
    gram = gram_of(g)
    compiled = weigh(make(cls), gram, xla=True)
    if cls is PCGrad:  # XLA draws other orders: the surgery for one of them
        errors = [np.abs(g.T @ compiled - reference_surgery(g, p)).max() for p in itertools.permutations(range(3))]
        assert min(errors) <= 1e-5 * np.abs(g).max()
        return
    plain = weigh(make(cls), gram)
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
@pytest.mark.parametrize("cls", CLASSES)
def test_direct_torch_namespace_gives_the_same_weights(cls):
    """The torch step runs the weightings it does not solve on the host with
    the direct-torch op namespace (`ops=torch_ops`); each method must weigh
    as it does through keras.ops (the plain path of `weigh`, whatever the
    engine: comparing the NumPy path with itself would check nothing)."""
    from keras_mgda.backend import torch_ops

    for family in ("aligned", "random", "mixed", "low_rank"):
        for num_tasks in (1, 2, 3, 10, 40):
            gram = gram_of(gradients(family, num_tasks, seed=0))
            losses = np.linspace(0.5, 2.0, num_tasks).astype(np.float32)
            results = []
            for fast in (False, True):
                weighting = cls(**({"seed": 3} if cls is PCGrad else {}))
                weighting.build(num_tasks, [f"t{i}" for i in range(num_tasks)])
                results.append(weigh(weighting, gram, losses, namespace=torch_ops if fast else ops))
            expected, got = results
            np.testing.assert_allclose(
                got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                err_msg=f"{cls.__name__} {family} T={num_tasks}",
            )
