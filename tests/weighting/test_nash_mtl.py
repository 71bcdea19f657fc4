"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution, alpha > 0
with (M alpha)_t = 1 / alpha_t, solved with a ridge epsilon |g_t|^2 on M's
diagonal that keeps it finite where no solution exists; the weights are
alpha * min(1, max_norm / sqrt(T)) (the authors' clipping of the shared
update, a constant factor at the solution).

Checked: the shared properties (_asserts.py; alpha scales as 1 / sqrt(s)
when M is scaled by s); the bargaining equations on random problems and
closed forms; on the degenerate problems the (ridged) equations where a
solution exists and finite, bounded weights where none does, in float32
and float64; and torchjd's Nash-MTL on random well-conditioned problems.
"""

import warnings

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.nash_mtl import NashMTL

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._calling import weigh_in
from ._problems import CASES
from ._problems import DEGENERATE
from ._problems import exact_params
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = NashMTL  # conftest: the engines follow its solvable_on_host
OPTIONS = {"max_norm": 2.0, "mode": "parameters", "head_update": "full", "max_iters": 20, "epsilon": 1e-5}
EPSILON = 1e-6  # the default ridge


def clip_factor(num_tasks):
    """The default clipping (max_norm = 1): the weights are alpha times this."""
    return min(1.0, 1.0 / np.sqrt(num_tasks))


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(NashMTL, OPTIONS)
    asserts.assert_gradient_options(NashMTL, default_head_update="scaled")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(NashMTL)
    with pytest.raises(ValueError, match="epsilon"):
        NashMTL(epsilon=0.0)


def test_head_weights():
    """The heads get the unclipped alpha: weights / min(1, 1 / sqrt(3))."""
    asserts.assert_head_weights(NashMTL, scaled=np.array([0.5, 2.0, 3.0]) * np.sqrt(3.0), rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    perm = rng.permutation(num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks)
    asserts.assert_permutation_equivariant(make(NashMTL), gram, losses, perm, engine)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale(num_tasks, engine):
    """alpha is in units of 1 / |g|: scaling M by s scales it by 1 / sqrt(s)."""
    gram = gram_of(gradients("random", num_tasks, 8))
    asserts.assert_scale_invariant(make(NashMTL), gram, engine, exponent=-0.5)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(NashMTL), num_tasks, engine, zero_weight=0.0)
    asserts.assert_nan_for_non_finite_gram(make(NashMTL), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(NashMTL), [[4.0]], engine=engine), [0.5], rtol=1e-5)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(NashMTL), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    """The torch step runs a weighting it does not solve on the host with
    direct torch calls (`ops=torch_ops`): the same weights as keras.ops."""
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(NashMTL, torch_ops, ("aligned", "random", "mixed", "low_rank"), (1, 2, 3, 10, 40))


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_bargaining_solution(family, num_tasks, seed, engine):
    gram = gram_of(gradients(family, num_tasks, seed))
    # The authors' clipping of the shared update to norm 1 is a factor.
    clip = clip_factor(num_tasks)
    weights = weigh(NashMTL(), gram, engine=engine).astype(np.float64)
    alpha = weights / clip
    assert np.all(alpha > 0)
    residual = np.max(np.abs(alpha * (gram @ alpha) - 1.0))  # (M a)_t = 1 / a_t
    measure("nash_residual", residual)
    assert residual <= 1e-4
    np.testing.assert_allclose(alpha @ gram @ alpha, num_tasks, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(weights @ gram @ weights), min(np.sqrt(num_tasks), 1.0), rtol=1e-4)
    heads = np.asarray(ops.convert_to_numpy(NashMTL().head_weights(ops.convert_to_tensor(weights.astype(np.float32)))))
    np.testing.assert_allclose(heads, alpha, rtol=1e-6)


def test_closed_forms(engine):
    # Orthogonal gradients: alpha_t = 1 / ||g_t||.
    g = np.diag([1.0, 2.0, 4.0])
    np.testing.assert_allclose(weigh(NashMTL(max_norm=0), gram_of(g), engine=engine), [1.0, 0.5, 0.25], rtol=1e-5)
    np.testing.assert_allclose(
        weigh(NashMTL(), gram_of(g), engine=engine), np.array([1.0, 0.5, 0.25]) / np.sqrt(3), rtol=1e-5
    )
    # One task: the normalised gradient.
    np.testing.assert_allclose(weigh(NashMTL(), [[16.0]], engine=engine), [0.25], rtol=1e-6)


def test_scale_and_zero_task(engine):
    gram = gram_of(gradients("random", 3, 0))
    base = weigh(NashMTL(), gram, engine=engine)
    for factor in (2.0**-40, 1e-20, 4.0, 1e30):
        np.testing.assert_allclose(weigh(NashMTL(), gram * factor, engine=engine) * np.sqrt(factor), base, rtol=1e-5)
    g = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(weigh(NashMTL(max_norm=0), gram_of(g), engine=engine), [1.0, 0.0, 0.5], rtol=1e-5)


def test_no_solution_stays_finite(engine):
    """Opposite gradients: no direction helps both, f is unbounded; the
    ridge keeps alpha near 1 / sqrt(epsilon)."""
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])
    alpha = weigh(NashMTL(), gram_of(g), engine=engine) * np.sqrt(2.0)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    assert np.max(alpha) <= 10.0 / np.sqrt(EPSILON)


# ----------------------------------------------- degenerate, exact reference

# The equation solved is the ridged one, alpha_t ((M + epsilon diag(M))
# alpha)_t = 1. Bounds on its residual: a solution exists (the origin
# outside the hull: "outside", "full"); it exists but is ill-conditioned
# (1e-3 outside: "near", alpha |g| ~ 300, so the ridged system's condition
# is ~1e5); none exists (the origin inside or on the hull: the ridge alone
# keeps alpha finite, alpha |g| ~ 1/sqrt(epsilon), condition ~1/epsilon,
# beyond what float32 resolves: there float32 promises finite, positive,
# bounded weights and nothing more; measured residuals up to 1.1).
# Worst measured (float64 / float32): 2.4e-15 / 1.1e-6, 2.2e-11 / 1.9e-2,
# 1.4e-9 / (1.1).
RIDGED_TOL = {
    "float64": {"regular": 1e-12, "near": 1e-9, "none": 1e-8},
    "float32": {"regular": 1e-5, "near": 5e-2, "none": None},
}


def _regime(problem):
    return {"outside": "regular", "full": "regular", "near": "near"}.get(problem.hull, "none")


@pytest.mark.parametrize("name,dtype,path", exact_params())
def test_exact_on_degenerate_problems(name, dtype, path):
    """Uncapped: alpha > 0, finite and bounded (alpha_t |g_t| <= 10 / sqrt(epsilon));
    the ridged bargaining equations hold (to the regime's bound); where a
    solution exists, the plain ones too, up to the ridge's own effect
    epsilon alpha_t^2 M_tt."""
    problem = DEGENERATE[name]
    gram, num_tasks = problem.gram, problem.num_tasks
    alpha = weigh_in(NashMTL(weight_cap=None), gram, dtype, path) / clip_factor(num_tasks)
    assert np.all(alpha > 0), alpha
    norms = np.sqrt(np.diag(gram))
    largest = np.max(alpha * norms)
    measure(f"nash_degenerate_alpha_norm_{_regime(problem)}", largest)
    assert largest <= 10.0 / np.sqrt(EPSILON)
    ridge = EPSILON * alpha**2 * np.diag(gram)
    ridged = np.max(np.abs(alpha * (gram @ alpha) + ridge - 1.0))
    measure(f"nash_degenerate_ridged_{dtype}_{_regime(problem)}", ridged)
    bound = RIDGED_TOL[dtype][_regime(problem)]
    assert bound is None or ridged <= bound, ridged
    if _regime(problem) == "regular":
        plain = np.max(np.abs(alpha * (gram @ alpha) - 1.0))
        measure(f"nash_degenerate_plain_{dtype}", plain)
        assert plain <= 2 * np.max(ridge) + RIDGED_TOL[dtype]["regular"], plain


def test_float64_keras_ops_path_is_float64_accurate():
    """Given float64, the method computes in float64 through keras.ops as
    through NumPy (eagerly; JAX computes in float32 unless x64 is on)."""
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("nash_mtl_float64_paths", asserts.assert_float64_paths_agree(NashMTL(), g @ g.T))


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's Nash-MTL (max_norm=0: no clipping) on the same gradients.
    It normalises the Gramian by its Frobenius norm inside the constraint
    alpha_t (M alpha)_t >= 1 only, so its alpha is on our scale, and solves
    the authors' sequence of convex programs (cvxpy, ECOS, at most 20, from
    alpha = 1, stopping at |M alpha - 1/alpha| < 1e-3). Where those converge
    (their residual below 1e-4) the weights agree to 1e-5, our ridge
    epsilon = 1e-6 being the difference; where they stop short (measured up
    to 4.4 at T = 10), ours must satisfy the equations, and better."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's warnings about ECOS
        expected = aggregation.NashMTL(n_tasks=num_tasks, max_norm=0.0).weighting(torch.from_numpy(g)).numpy()
    theirs = np.max(np.abs(expected * (gram @ expected) - 1.0))
    for dtype, path in (("float64", "numpy"), ("float32", "keras")):
        alpha = weigh_in(NashMTL(max_norm=0), gram.astype(dtype).astype(np.float64), dtype, path)
        ours = np.max(np.abs(alpha * (gram @ alpha) - 1.0))
        assert ours <= 1e-4, (dtype, ours)
        if theirs <= 1e-4:
            error = np.abs(alpha - expected).max() / np.abs(expected).max()
            measure(f"nash_vs_torchjd_{dtype}", error)
            assert error <= 1e-5, (dtype, error)
        else:
            measure("nash_torchjd_unconverged_residual", theirs)
            assert ours < theirs


# ------------------------------------------------- update_weights_every


def test_update_weights_every_options():
    assert NashMTL().update_weights_every == 1
    asserts.assert_config_round_trip(NashMTL, {"update_weights_every": 3})
    for bad in (0, 1.5, -2):
        with pytest.raises(ValueError, match="update_weights_every"):
            NashMTL(update_weights_every=bad)
    one = NashMTL()
    one.build(3)
    assert not one.variables and one.solvable_on_host  # k = 1: today's weighting, no state
    every = NashMTL(update_weights_every=3)
    every.build(3)
    assert [v.name for v in every.variables] == ["last_alpha", "steps_since_solve"]
    assert not every.solvable_on_host


def reuse_clip(alpha, gram, max_norm=1.0):
    """The authors' clipping of a reused alpha's update, in float64."""
    norm = np.sqrt(alpha @ gram @ alpha)
    return alpha * min(1.0, max_norm / norm)


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_update_weights_every_solves_every_k_steps(every, max_norm):
    """Steps 0, k, 2k, ... solve (the weights of a fresh k = 1 weighting on
    that step's Gram matrix); the steps between reuse that alpha, clipped
    by the norm of its update with their own Gram matrix (not clipped with
    max_norm=0: the solved weights bit for bit); the heads get alpha."""
    weighting = NashMTL(update_weights_every=every, max_norm=max_norm)
    weighting.build(4)
    for step in range(7):
        gram = gram_of(gradients("random", 4, step))
        weights = weigh(weighting, gram)
        head = np.asarray(ops.convert_to_numpy(weighting.head_weights(ops.convert_to_tensor(weights))))
        if step % every == 0:
            np.testing.assert_allclose(weights, weigh(NashMTL(max_norm=max_norm), gram), rtol=1e-6, err_msg=str(step))
            alpha = head.copy()
            np.testing.assert_allclose(weights, alpha * min(1.0, max_norm / 2.0) if max_norm else alpha, rtol=1e-6)
        elif max_norm:
            np.testing.assert_array_equal(head, alpha)
            np.testing.assert_allclose(weights, reuse_clip(alpha, gram), rtol=1e-5, err_msg=str(step))
        else:
            np.testing.assert_array_equal(weights, alpha)
    assert float(ops.convert_to_numpy(weighting.steps_since_solve)) == 7 % every


def test_update_weights_every_gives_nan_for_a_non_finite_gram_when_reusing():
    weighting = NashMTL(update_weights_every=3)
    weighting.build(3)
    gram = gram_of(gradients("random", 3, 0))
    weigh(weighting, gram)
    gram[0, 1] = gram[1, 0] = np.nan
    assert np.all(np.isnan(weigh(weighting, gram)))


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_update_weights_every_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    compiled, plain = NashMTL(update_weights_every=2), NashMTL(update_weights_every=2)
    compiled.build(3)
    plain.build(3)
    for step in range(3):
        gram = gram_of(gradients("random", 3, step))
        np.testing.assert_allclose(weigh(compiled, gram, xla=True), weigh(plain, gram), rtol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_update_weights_every_agrees_with_torchjd(max_norm):
    """torchjd's NashMTL(update_weights_every=3) over 7 steps: the same
    schedule (solve at steps 0, 3, 6; reuse alpha between, clipped by its
    update's norm at every step, as the authors) and, where its solver
    converged, the same weights."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    theirs = aggregation.NashMTL(n_tasks=3, max_norm=max_norm, update_weights_every=3)
    ours = NashMTL(max_norm=max_norm, update_weights_every=3)
    ours.build(3)
    converged = False
    for step in range(7):
        g = well_conditioned(3, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy's warnings about ECOS
            expected = theirs.weighting(torch.from_numpy(g)).numpy()
        weights = weigh(ours, gram_of(g))
        if step % 3 == 0:
            alpha = theirs.weighting.prvs_alpha
            converged = np.max(np.abs(alpha * (g @ g.T @ alpha) - 1.0)) <= 1e-4
        if converged:
            error = np.abs(weights - expected).max() / np.abs(expected).max()
            measure(f"nash_every_vs_torchjd_max_norm_{max_norm}", error)
            assert error <= 1e-5, (step, error)


OPPOSITE = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.5, 3.0]])


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_weight_cap_on_opposite_gradients(scale, engine):
    """Opposite gradients have no bargaining solution: uncapped, only the
    ridge stops alpha_t |g_t| (hundreds); with the default cap the same
    weights are scaled down together to max alpha_t |g_t| = 10, whatever
    the gradients' size, so the heads ("scaled") get at most 10 / |g_t|
    times their gradient and the shared update stays within sqrt(T)."""
    g = OPPOSITE * scale
    gram = gram_of(g)
    norms = np.sqrt(np.diag(gram))
    raw = weigh(NashMTL(weight_cap=None), gram, engine=engine)
    capped = weigh(make(NashMTL), gram, engine=engine)
    assert np.max(raw * norms) / clip_factor(3) > 100
    alpha = capped / clip_factor(3)
    np.testing.assert_allclose(np.max(alpha * norms), 10.0, rtol=1e-5)
    np.testing.assert_allclose(capped / capped.max(), raw / raw.max(), rtol=1e-5)
    heads = np.asarray(ops.convert_to_numpy(make(NashMTL).head_weights(ops.convert_to_tensor(capped))))
    assert np.max(heads * norms) <= 10.0 * (1 + 1e-5)
    assert np.linalg.norm(capped @ g) <= min(np.sqrt(3.0), 1.0) * (1 + 1e-5)


def test_weight_cap_leaves_regular_solutions(engine):
    """Independent gradients (a solution with alpha_t |g_t| below 10): the
    cap changes nothing, bit for bit."""
    gram = gram_of(gradients("random", 5, 2))
    np.testing.assert_array_equal(
        weigh(make(NashMTL), gram, engine=engine), weigh(NashMTL(weight_cap=None), gram, engine=engine)
    )
    with pytest.raises(ValueError, match="weight_cap"):
        NashMTL(weight_cap=0.0)
