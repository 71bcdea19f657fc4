"""FairGrad (Ban & Ji, ICML 2024): w > 0 with (M w)_i = w_i^(-1/alpha).

Checked: the shared properties (_asserts.py; scaling M by s scales w by
s^(-alpha / (alpha + 1))); the defining equations, (M w)_i w_i^(1/alpha)
= 1, to the ridge epsilon in float32 and to rounding in float64 with a
negligible ridge; alpha = 1 is Nash-MTL's bargaining solution; finite
weights on the degenerate problems; and torchjd's FairGrad (scipy's
least_squares) on random full-rank problems.
"""

import numpy as np
import pytest

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting.fairgrad import FairGrad
from keras_mgda.weighting.nash_mtl import NashMTL

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._calling import weigh_in
from ._problems import DEGENERATE
from ._problems import DEGENERATE_NAMES
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = FairGrad  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled", "alpha": 2.0, "max_iters": 30, "epsilon": 1e-8}
ALPHAS = [0.5, 1.0, 2.0]


def _instance(alpha):
    return make(FairGrad) if alpha == 1.0 else FairGrad(alpha=alpha)


def residual(gram, weights, alpha):
    """max_i |(M w)_i w_i^(1/alpha) - 1| over the tasks with a gradient."""
    active = np.diag(gram) > 0
    w = weights[active]
    return np.abs((gram @ weights)[active] * w ** (1.0 / alpha) - 1.0).max()


def rounding_residual(gram, weights, alpha):
    """max_i |(M w)_i - w_i^(-1/alpha)| / (|M| |w|)_i: the equations'
    error relative to the size of their terms, the scale at which M's own
    rounding (and the relative ridge) moves them; where the terms of
    (M w)_i cancel, the plain residual is larger by that cancellation."""
    active = np.diag(gram) > 0
    w = weights[active]
    error = np.abs((gram @ weights)[active] - w ** (-1.0 / alpha))
    return (error / (np.abs(gram) @ np.abs(weights))[active]).max()


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(FairGrad, OPTIONS)
    asserts.assert_gradient_options(FairGrad, default_head_update="full")
    assert FairGrad().alpha == 1.0


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(FairGrad)
    for bad in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="alpha"):
            FairGrad(alpha=bad)
    with pytest.raises(ValueError, match="epsilon"):
        FairGrad(epsilon=0.0)


def test_head_weights():
    asserts.assert_head_weights(FairGrad)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    asserts.assert_permutation_equivariant(
        make(FairGrad), gram, rng.uniform(0.1, 3.0, num_tasks), rng.permutation(num_tasks), engine
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale(num_tasks, alpha, engine):
    """M -> s M scales w by s^(-alpha / (alpha + 1))."""
    gram = gram_of(gradients("random", num_tasks, 8))
    asserts.assert_scale_invariant(_instance(alpha), gram, engine, exponent=-alpha / (alpha + 1.0))


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(FairGrad), num_tasks, engine, zero_weight=0.0)
    asserts.assert_nan_for_non_finite_gram(make(FairGrad), num_tasks, engine)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_single_task(alpha, engine):
    """4 w = w^(-1/alpha): w = 4^(-alpha / (alpha + 1)) (to the ridge)."""
    expected = 4.0 ** (-alpha / (alpha + 1.0))
    np.testing.assert_allclose(weigh(_instance(alpha), [[4.0]], engine=engine), [expected], rtol=2e-6)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(FairGrad), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(
        lambda: FairGrad(alpha=2.0), torch_ops, ["random", "aligned", "mixed"], (1, 2, 3, 10, 40), rtol=1e-4
    )


def test_float64_keras_ops_path_is_float64_accurate():
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("fairgrad_float64_paths", asserts.assert_float64_paths_agree(FairGrad(alpha=2.0), g @ g.T, rtol=1e-10))


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks", [2, 3, 10, 40])
def test_solves_the_equations(family, num_tasks, alpha, engine):
    """(M w)_i = w_i^(-1/alpha) for independent gradients (a solution
    exists), to the ridge epsilon = 1e-6 and float32 rounding relative to
    the size of the terms (`rounding_residual`; the mixed family, norms
    1e-4 to 1e4 with conflicts, has plain residuals up to 0.25 from that
    cancellation, in float64 as in float32)."""
    gram = gram_of(gradients(family, num_tasks, 1))
    weights = weigh(_instance(alpha), gram, engine=engine).astype(np.float64)
    assert np.all(weights > 0)
    error = rounding_residual(gram, weights, alpha)
    measure(f"fairgrad_rounding_residual_{family}", error)
    assert error <= 3e-6, error
    if family != "mixed":
        measure(f"fairgrad_residual_{family}", residual(gram, weights, alpha))
        assert residual(gram, weights, alpha) <= 3e-5


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("num_tasks", [2, 5, 10])
def test_exact_in_float64(num_tasks, alpha):
    """In float64 with a negligible ridge the equations hold to rounding:
    the ridge is the only approximation."""
    g = well_conditioned(num_tasks, 3)
    weights = FairGrad(alpha=alpha, epsilon=1e-14)(np.ones(num_tasks), g @ g.T, ops=numpy_ops)
    error = residual(g @ g.T, weights, alpha)
    measure("fairgrad_residual_float64", error)
    assert error <= 1e-11, error


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_alpha_one_is_the_nash_bargaining_solution(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 4))
    fair = weigh(make(FairGrad), gram, engine=engine)
    nash = weigh(NashMTL(max_norm=0), gram, engine=engine)
    np.testing.assert_allclose(fair, nash, rtol=1e-5)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_degenerate_problems_give_bounded_weights(alpha):
    """Where no solution exists (the origin in, on or near the hull of the
    gradients) the ridge keeps w finite: |d|^2 = sum_i w_i^(1 - 1/alpha)
    at the solution, with w_i up to (epsilon |g_i|^2)^(-alpha / (alpha + 1))
    in units of the largest gradient, so for alpha > 1 a tiny task
    gradient can make d large (measured |d| / sqrt(T) up to 2.8e2 at
    alpha = 2, norms 2^-10 to 2^10; 1.3 at alpha = 0.5 and 1.0 at 1)."""
    for name in DEGENERATE_NAMES:
        problem = DEGENERATE[name]
        unit = problem.gram / np.max(np.diag(problem.gram))
        weights = FairGrad(alpha=alpha)(np.ones(problem.num_tasks), unit.astype(np.float32), ops=numpy_ops)
        weights = weights.astype(np.float64)
        assert np.all(np.isfinite(weights)) and np.all(weights >= 0), name
        size = np.sqrt(max(weights @ unit @ weights, 0.0)) / np.sqrt(problem.num_tasks)
        measure(f"fairgrad_degenerate_size_alpha{alpha}", size)
        assert size <= (1e4 if alpha > 1 else 10.0), (name, size)


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed, alpha):
    """torchjd's FairGrad weights (scipy's least_squares on Eq. 4 from
    w = 1/T, as the authors' code) on the same Gramian (independent
    gradients in R^20, so the solution is unique). Our ridge epsilon = 1e-6
    is the difference (measured up to 3e-6); both solve the equations."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    expected = aggregation.FairGradWeighting(alpha=alpha)(torch.from_numpy(gram)).numpy()
    assert residual(gram, expected, alpha) <= 1e-6
    for dtype, path in (("float64", "numpy"), ("float32", "keras")):
        weights = weigh_in(FairGrad(alpha=alpha), gram.astype(dtype).astype(np.float64), dtype, path)
        error = np.abs(weights - expected).max() / np.abs(expected).max()
        measure(f"fairgrad_vs_torchjd_{dtype}", error)
        assert error <= 1e-5, (dtype, error)
        assert residual(gram, weights, alpha) <= 3e-5


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_weight_cap_on_opposite_gradients(scale, engine):
    """Opposite gradients (no solution of Eq. 4): uncapped, only the ridge
    stops w_i |g_i| (hundreds at alpha = 1); with the default cap the same
    weights are scaled down together to max w_i |g_i| = 100, at any
    gradient size, and the update stays within sqrt(T)."""
    g = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.5, 3.0]]) * scale
    gram = gram_of(g)
    norms = np.sqrt(np.diag(gram))
    raw = weigh(FairGrad(weight_cap=None, epsilon=1e-8), gram, engine=engine)
    capped = weigh(FairGrad(epsilon=1e-8), gram, engine=engine)
    assert np.max(raw * norms) > 1000
    np.testing.assert_allclose(np.max(capped * norms), 100.0, rtol=1e-5)
    np.testing.assert_allclose(capped / capped.max(), raw / raw.max(), rtol=1e-5)
    assert np.linalg.norm(capped @ g) <= np.sqrt(3.0) * (1 + 1e-5)
    with pytest.raises(ValueError, match="weight_cap"):
        FairGrad(weight_cap=-1.0)
