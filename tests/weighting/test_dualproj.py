"""DualProj (Quinton & Rey 2024, torchjd): the mean gradient projected onto
the dual cone of the task gradients, w = argmin_{w >= u} w^T M w with
u = 1/T (or the preferences).

Checked: the shared properties (_asserts.py); the projection's KKT
conditions (w >= u, M w >= 0, complementarity), so M w >= 0; the
preferences; and torchjd's DualProj on random full-rank problems.
"""

import numpy as np
import pytest

from keras_mgda.weighting.dualproj import DualProj

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._calling import weigh_in
from ._problems import CASES
from ._problems import TASKS
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = DualProj  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled", "max_rounds": 30, "preferences": [1.0, 2.0]}
FAMILIES = ["random", "aligned", "mixed", "low_rank"]


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(DualProj, OPTIONS)
    asserts.assert_config_round_trip(DualProj, {"preferences": {"a": 1.0, "b": 3.0}})
    asserts.assert_gradient_options(DualProj, default_head_update="full")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(DualProj)
    for bad in ([1.0, 0.0], [1.0, -2.0], [1.0, np.inf], []):
        with pytest.raises(ValueError, match="preferences"):
            DualProj(preferences=bad)


def test_head_weights():
    asserts.assert_head_weights(DualProj)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    asserts.assert_permutation_equivariant(
        make(DualProj), gram, rng.uniform(0.1, 3.0, num_tasks), rng.permutation(num_tasks), engine
    )


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    asserts.assert_scale_invariant(make(DualProj), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(DualProj), num_tasks, engine, zero_weight=1.0 / num_tasks)
    asserts.assert_nan_for_non_finite_gram(make(DualProj), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(DualProj), [[4.0]], engine=engine), [1.0], rtol=1e-6)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(DualProj), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(DualProj, torch_ops, FAMILIES, (1, 2, 3, 10, 40))


def test_float64_keras_ops_path_is_float64_accurate():
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("dualproj_float64_paths", asserts.assert_float64_paths_agree(DualProj(), g @ g.T))


# ------------------------------------------------------- defining conditions


def kkt_residual(gram, w, lower):
    """Worst natural KKT residual of min w^T M w s.t. w >= lower:
    min((w - u)_j / max|w|, (M w)_j / (|M| |w|)_j), 0 at the optimum."""
    grad = gram @ w
    noise = np.abs(gram) @ np.abs(w)
    relative = np.where(noise > 0, grad / np.where(noise > 0, noise, 1.0), 0.0)
    return np.abs(np.minimum((w - lower) / np.abs(w).max(), relative)).max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_tasks,seed", [c for c in CASES if c[0] in (2, 3, 40)])
def test_projection_satisfies_kkt(family, num_tasks, seed, engine):
    """w >= u, M w >= 0 and (w - u)_j (M w)_j = 0 (to float32 rounding):
    the projection of the mean, which conflicts with no task."""
    gram = gram_of(gradients(family, num_tasks, seed))
    weights = weigh(make(DualProj), gram, engine=engine).astype(np.float64)
    lower = np.full(num_tasks, 1.0 / num_tasks)
    assert np.all(weights >= lower * (1 - 1e-6))
    residual = kkt_residual(gram, weights, lower)
    measure("dualproj_kkt", residual)
    assert residual <= 1e-5
    measure("dualproj_min_Mw", asserts.assert_no_conflict(gram, weights, tol=1e-5))


@pytest.mark.parametrize("num_tasks", TASKS)
def test_without_conflicts_is_the_mean(num_tasks, engine):
    g = np.abs(gradients("aligned", num_tasks, 1))
    weights = weigh(make(DualProj), gram_of(g), engine=engine)
    np.testing.assert_allclose(weights, np.full(num_tasks, 1.0 / num_tasks), rtol=1e-6)


def test_preferences_by_task_name(engine):
    """A dict of preferences is resolved by task name when the model builds
    the weighting; the projection then starts from u = those values."""
    g = np.abs(gradients("aligned", 3, 2))  # no conflict: w = u
    weighting = DualProj(preferences={"b": 2.0, "a": 1.0, "c": 0.5})
    weighting.build(3, ["a", "b", "c"])
    np.testing.assert_allclose(weigh(weighting, gram_of(g), engine=engine), [1.0, 2.0, 0.5], rtol=1e-7)
    with pytest.raises(ValueError, match="task names"):
        weigh(DualProj(preferences={"a": 1.0, "b": 1.0}), gram_of(g[:2]), engine=engine)


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's DualProj weights on the same Gramian (independent
    gradients in R^20: the projection is unique). torchjd normalises the
    Gramian (no effect) and by default adds reg_eps = 1e-4 to its diagonal
    for quadprog, which moves its weights by up to ~7e-3 here (its KKT
    residual up to 2.4e-4, ours at rounding level): these Gramians are
    positive definite, so the comparison is with reg_eps = 0."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    from torchjd.linalg import QuadprogProjector

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    projector = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    expected = aggregation.DualProjWeighting(projector=projector)(torch.from_numpy(gram)).numpy()
    for dtype, path, rtol in (("float64", "numpy", 1e-12), ("float32", "keras", 1e-5)):
        weights = weigh_in(DualProj(), gram.astype(dtype).astype(np.float64), dtype, path)
        error = np.abs(weights - expected).max() / np.abs(expected).max()
        measure(f"dualproj_vs_torchjd_{dtype}", error)
        assert error <= rtol, (dtype, error)
