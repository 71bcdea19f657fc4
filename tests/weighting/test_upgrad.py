"""UPGrad (Quinton & Rey 2024): each task gradient projected onto the dual
cone of all of them, w_i = argmin_{w >= e_i} w^T M w, and the weights are
the mean of the w_i.

Checked: the shared properties (_asserts.py); the KKT conditions of every
projection (w >= e_i, M w >= 0, complementarity), so M w >= 0 for the
mean; on the degenerate problems (_problems.py), each projection against
the exact QP (`references.bound_qp`, certified in 50-digit arithmetic), in
float32 and float64; and torchjd's UPGrad on random full-rank problems.
"""

import numpy as np
import pytest
from keras import ops
from qp_reference import objective
from references import bound_qp

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting import upgrad
from keras_mgda.weighting.upgrad import UPGrad

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import compiled_function
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._calling import weigh_in
from ._problems import CASES
from ._problems import DEGENERATE
from ._problems import TASKS
from ._problems import exact_params
from ._problems import gradients
from ._problems import gram_of
from ._problems import random_degenerate
from ._problems import unit_scaled
from ._problems import well_conditioned

WEIGHTING = UPGrad  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled", "max_rounds": 30}
FAMILIES = ["random", "aligned", "mixed", "low_rank"]


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(UPGrad, OPTIONS)
    asserts.assert_gradient_options(UPGrad, default_head_update="full")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(UPGrad)


def test_head_weights():
    asserts.assert_head_weights(UPGrad)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    perm = rng.permutation(num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks)
    asserts.assert_permutation_equivariant(make(UPGrad), gram, losses, perm, engine)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    asserts.assert_scale_invariant(make(UPGrad), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(UPGrad), num_tasks, engine, zero_weight=1.0 / num_tasks)
    asserts.assert_nan_for_non_finite_gram(make(UPGrad), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(UPGrad), [[4.0]], engine=engine), [1.0], rtol=1e-5)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(UPGrad), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    """The torch step runs a weighting it does not solve on the host with
    direct torch calls (`ops=torch_ops`): the same weights as keras.ops."""
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(UPGrad, torch_ops, FAMILIES, (1, 2, 3, 10, 40))


# ------------------------------------------------------- defining conditions


def kkt_residual(gram, weights, lower):
    """Worst natural KKT residual of min w^T M w s.t. w >= lower, per row:
    min((w - u)_j / max|w|, (M w)_j / (|M| |w|)_j), which is 0 exactly at
    the optimum (free: gradient 0; bound: gradient >= 0)."""
    assert len(weights) == len(lower)
    worst = 0.0
    for w, u in zip(weights, lower, strict=True):
        grad = gram @ w
        noise = np.abs(gram) @ np.abs(w)
        relative = np.where(noise > 0, grad / np.where(noise > 0, noise, 1.0), 0.0)
        residual = np.minimum((w - u) / np.abs(w).max(), relative)
        worst = max(worst, np.abs(residual).max())
    return worst


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_tasks,seed", [c for c in CASES if c[0] in (3, 40)])
def test_projections_satisfy_kkt(family, num_tasks, seed, engine):
    gram = gram_of(gradients(family, num_tasks, seed))
    unit = (gram / np.max(np.diag(gram))).astype(np.float32)
    lower = np.eye(num_tasks, dtype=np.float32)
    projections = compiled_function(upgrad.project_onto_dual_cone, num_tasks)(unit, lower)
    projections = np.asarray(ops.convert_to_numpy(projections), np.float64)
    residual = kkt_residual(unit.astype(np.float64), projections, np.eye(num_tasks))
    measure("upgrad_kkt", residual)
    assert residual <= 1e-5
    weights = weigh(UPGrad(), gram, engine=engine).astype(np.float64)
    # The same direction as the mean projection (weights are not unique for
    # rank-deficient M): |G^T (w - mean)| small.
    difference = weights - projections.mean(0)
    assert difference @ gram @ difference <= 1e-8 * max(weights @ gram @ weights, np.max(np.diag(gram)) * 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_does_not_conflict(family, num_tasks, seed, engine):
    """The mean of vectors in the dual cone is in the dual cone: M w >= 0,
    no task's loss increases to first order."""
    gram = gram_of(gradients(family, num_tasks, seed))
    weights = weigh(UPGrad(), gram, engine=engine)
    measure("upgrad_min_Mw", asserts.assert_no_conflict(gram, weights, tol=1e-5))


@pytest.mark.parametrize("num_tasks", TASKS)
def test_without_conflicts_is_the_mean(num_tasks, engine):
    g = np.abs(gradients("aligned", num_tasks, 1))
    weights = weigh(UPGrad(), gram_of(g), engine=engine)
    np.testing.assert_allclose(weights, np.full(num_tasks, 1.0 / num_tasks), rtol=1e-7)


def test_two_opposite_gradients(engine):
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])
    np.testing.assert_allclose(gram_of(g) @ weigh(UPGrad(), gram_of(g), engine=engine), 0.0, atol=1e-5)


# ----------------------------------------------- degenerate, exact reference

# Relative bounds, per dtype. Worst measured (torch, NumPy and keras.ops
# paths): value gap 1.9e-16 / 1.2e-7 (float64 / float32), unique weights
# 1.5e-15 / 2.9e-7, direction 6.0e-17 / 1.9e-8, conflict 1.3e-16 / 8.8e-8,
# bound (max_k |w_k| |g_k| / max_k |g_k|) 0.57.
EXACT_TOL = {
    "float64": {"value": 1e-12, "weights": 1e-10, "direction": 1e-12, "conflict": 1e-13},
    "float32": {"value": 1e-6, "weights": 1e-4, "direction": 1e-5, "conflict": 1e-6},
}


def _projections_in(unit, dtype, path):
    """project_onto_dual_cone(unit, I) through `path` in `dtype`, as float64."""
    num_tasks = len(unit)
    eye = np.eye(num_tasks, dtype=dtype)
    if path == "numpy":
        with np.errstate(all="ignore"):
            out = upgrad.project_onto_dual_cone(unit.astype(dtype), eye, ops=numpy_ops)
    elif dtype == "float32":
        out = compiled_function(upgrad.project_onto_dual_cone, num_tasks)(unit.astype(dtype), eye)
    else:
        if BACKEND == "jax":
            pytest.skip("float64 keras.ops on JAX: covered by the NumPy path (jit per call is slow)")
        out = upgrad.project_onto_dual_cone(ops.convert_to_tensor(unit, dtype), ops.convert_to_tensor(eye))
    out = np.asarray(ops.convert_to_numpy(out))
    assert out.dtype == np.dtype(dtype)
    return out.astype(np.float64)


@pytest.mark.parametrize("name,dtype,path", exact_params())
def test_exact_on_degenerate_problems(name, dtype, path):
    """Rank-deficient M (T = 5..16 gradients in a plane, the origin inside,
    on or just outside their hull), norms 1e-3 to 1e3 apart, duplicated and
    opposite gradients, and badly scaled full-rank M: every projection w_i
    is feasible and optimal (its value w_i^T M w_i is the exact QP optimum
    to rounding; where M is nonsingular the minimiser is unique and w_i is
    compared too); the weights are bounded, conflict with no task (M w >= 0
    to rounding) and point where the exact mean projection points (the
    projections G^T w_i are unique even where the w_i are not)."""
    check_exact(DEGENERATE[name], dtype, path)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_on_random_degenerate_problems(dtype):
    """The checks of `test_exact_on_degenerate_problems` on 30 random
    rank-2 problems (T = 5..16, the origin inside, near or outside the
    hull, norms equal-ish or 1e-3 to 1e3 apart), through NumPy."""
    for seed in range(30):
        check_exact(random_degenerate(seed), dtype, "numpy")


def check_exact(problem, dtype, path):
    """Every projection feasible and optimal against `bound_qp` (the
    minimiser itself where unique); the weights bounded, without conflict
    and in the exact mean projection's direction."""
    num_tasks, gram, tol = problem.num_tasks, problem.gram, EXACT_TOL[dtype]
    eps = float(np.finfo(dtype).eps)
    unit = unit_scaled(gram)
    eye = np.eye(num_tasks)
    references = [bound_qp(unit, eye[i]) for i in range(num_tasks)]
    projections = _projections_in(unit, dtype, path)
    assert np.all(np.isfinite(projections))
    for i, (value, exact, _) in enumerate(references):
        w = projections[i]
        assert np.all(w - eye[i] >= -eps * np.abs(w).max()), (i, w)
        noise = eps * (np.abs(w) @ np.abs(unit) @ np.abs(w))
        gap = abs(objective(unit, w) - value) / max(value, noise)
        measure(f"upgrad_degenerate_value_gap_{dtype}_{path}", gap)
        assert gap <= tol["value"], (i, gap)
        if problem.rank == num_tasks:  # the minimiser is unique
            error = np.abs(w - exact).max() / np.abs(exact).max()
            measure(f"upgrad_degenerate_weights_{dtype}_{path}", error)
            assert error <= tol["weights"], (i, error)

    weights = weigh_in(UPGrad(), gram, dtype, path)
    measure(f"upgrad_degenerate_bound_{dtype}_{path}", asserts.assert_bounded(weights, gram, bound=10.0))
    measure(f"upgrad_degenerate_conflict_{dtype}_{path}", asserts.assert_no_conflict(gram, weights, tol["conflict"]))
    mean = np.mean([exact for _, exact, _ in references], axis=0)
    norms = np.sqrt(np.diag(gram))
    direction = np.sqrt(max(objective(gram, weights - mean), 0.0)) / ((np.abs(weights) + np.abs(mean)) @ norms)
    measure(f"upgrad_degenerate_direction_{dtype}_{path}", direction)
    assert direction <= tol["direction"]


def test_float64_keras_ops_path_is_float64_accurate():
    """Given float64, the method computes in float64 through keras.ops as
    through NumPy (eagerly; JAX computes in float32 unless x64 is on)."""
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("upgrad_float64_paths", asserts.assert_float64_paths_agree(UPGrad(), g @ g.T))


# ------------------------------------------------------------ torchjd


TORCHJD_CASES = [(t, s) for t in range(2, 11) for s in (0, 1)]


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", TORCHJD_CASES)
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's UPGrad weights on the same Gramian (independent gradients
    in R^20, so the projections are unique). torchjd normalises the Gramian
    by its trace (no effect: the weights are scale invariant) and by default
    adds reg_eps = 1e-4 to its diagonal to keep quadprog's matrix positive
    definite, which moves the weights by up to ~7e-3 here: these Gramians
    are positive definite, so the comparison is with reg_eps = 0."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    from torchjd.linalg import QuadprogProjector

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    projector = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    expected = aggregation.UPGradWeighting(projector=projector)(torch.from_numpy(gram)).numpy()
    for dtype, path, rtol in (("float64", "numpy", 1e-12), ("float32", "keras", 1e-5)):
        weights = weigh_in(UPGrad(), gram.astype(dtype).astype(np.float64), dtype, path)
        error = np.abs(weights - expected).max() / np.abs(expected).max()
        measure(f"upgrad_vs_torchjd_{dtype}", error)
        assert error <= rtol, (dtype, error)
