"""MGDA (Sener & Koltun 2018) as a weighting: the minimum-norm point of the
convex hull of the (normalised) task gradients. Its solver,
`keras_mgda.solvers.min_norm`, has its own tests (tests/test_solvers.py);
here: the weighting's interface, the shared properties, the exact min-norm
point on the degenerate problems (`qp_reference.exact_min_norm`) in float32
and float64, and torchjd's MGDA."""

import numpy as np
import pytest
from qp_reference import exact_min_norm
from qp_reference import objective

from keras_mgda.weighting.mgda import MGDA

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import make
from ._calling import measure
from ._calling import weigh_in
from ._problems import DEGENERATE
from ._problems import exact_params
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = MGDA  # conftest: the engines follow its solvable_on_host
OPTIONS = {"normalization": "l2", "mode": "parameters", "head_update": "full", "max_iters": 5, "tol": 1e-6}


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(MGDA, OPTIONS)
    asserts.assert_gradient_options(MGDA, default_head_update="scaled")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(MGDA)
    with pytest.raises(ValueError, match="l2"):
        MGDA(normalization="max")


def test_head_weights():
    asserts.assert_head_weights(MGDA)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    perm = rng.permutation(num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks)
    asserts.assert_permutation_equivariant(make(MGDA), gram, losses, perm, engine)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    asserts.assert_scale_invariant(make(MGDA), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    """(Zero gradients are left out of the problem: all zero, uniform.)"""
    asserts.assert_finite_on_degenerate_grams(make(MGDA), num_tasks, engine, zero_weight=1.0 / num_tasks)
    asserts.assert_nan_for_non_finite_gram(make(MGDA), num_tasks, engine)


# ----------------------------------------------- degenerate, exact reference

# Relative gap (f(alpha) - f*) / max(f*, eps_dtype max_i M_ii) of
# f(a) = a^T M a (evaluated exactly), as tests/test_solvers.py measures it.
# Worst measured (float64 / float32): 1.2e-16 / 6.0e-8.
EXACT_GAP = {"float64": 1e-12, "float32": 1e-6}


@pytest.mark.parametrize("name,dtype,path", exact_params())
def test_exact_on_degenerate_problems(name, dtype, path):
    """MGDA(normalization="none") on the degenerate problems: weights on
    the simplex whose objective is the exact minimum (Wolfe's algorithm on
    the exact M) to rounding; no task conflicts with the update
    (g_i . d >= |d|^2 at the min-norm point)."""
    problem = DEGENERATE[name]
    gram = problem.gram
    eps = float(np.finfo(dtype).eps)
    alpha = weigh_in(MGDA(normalization="none"), gram, dtype, path)
    assert np.all(alpha >= 0)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=4 * len(gram) * eps)
    optimum = objective(gram, exact_min_norm(gram))
    gap = (objective(gram, alpha) - optimum) / max(optimum, eps * np.max(np.diag(gram)))
    measure(f"mgda_degenerate_gap_{dtype}_{path}", gap)
    assert gap <= EXACT_GAP[dtype], gap
    value = objective(gram, alpha)
    noise = np.abs(gram) @ alpha + value
    below = np.max((value - gram @ alpha) / noise)
    measure(f"mgda_degenerate_below_{dtype}", below)
    assert below <= 1e3 * eps, below


def test_float64_keras_ops_path_is_float64_accurate():
    """Given float64, MGDA computes in float64 through keras.ops as through
    NumPy (eagerly; JAX computes in float32 unless x64 is on): its solver
    keeps to `keras_mgda.numerics`, which holds on torch too."""
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("mgda_float64_paths", asserts.assert_float64_paths_agree(MGDA(), g @ g.T))


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's MGDA on the same Gramian is the paper's Frank-Wolfe with
    its stopping rule (step below epsilon = 1e-3, at most 100 steps): a
    point of the simplex, not the minimum (its direction measured up to
    17% off ours; still 2% off after 10^4 steps). So the property instead:
    ours is the min-norm point, so for torchjd's feasible point
    |d_theirs - d_ours|^2 <= |d_theirs|^2 - |d_ours|^2 (the projection
    inequality), to rounding; and ours is never worse."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    theirs = aggregation.MGDAWeighting()(torch.from_numpy(gram)).numpy()
    for dtype, path in (("float64", "numpy"), ("float32", "keras")):
        ours = weigh_in(MGDA(normalization="none"), gram.astype(dtype).astype(np.float64), dtype, path)
        slack = 1e3 * float(np.finfo(dtype).eps) * np.max(np.diag(gram))
        distance = objective(gram, theirs - ours)
        assert distance <= objective(gram, theirs) - objective(gram, ours) + slack, dtype
        measure(f"mgda_vs_torchjd_distance_{dtype}", np.sqrt(distance / objective(gram, ours)))
