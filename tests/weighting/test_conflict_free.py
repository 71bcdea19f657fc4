"""ConFIG (Liu, Chu & Thuerey, ICLR 2025): g_u = U^+ p / |U^+ p| for the
unit gradients U, update (sum_i g_i . g_u) g_u, written on the Gram matrix.

Checked: the shared properties (_asserts.py); the defining property (for
independent gradients the update makes the same angle with every task
gradient, its length is the sum of the projections); a NumPy reference
of the paper's equation with the pseudo-inverse of U itself, on exactly
rank-deficient problems too; zero and cancelling gradients; and torchjd's
ConFIG on random full-rank Jacobians (directions compared).
"""

import numpy as np
import pytest

from keras_mgda.weighting.conflict_free import ConFIG

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._calling import weigh_in
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = ConFIG  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled", "preferences": [1.0, 2.0, 0.5]}


def reference(g, preferences=None):
    """The paper's Eq. 2 on explicit vectors (float64): unit gradients,
    torch.linalg.pinv's default cut-off, the sum of the projections."""
    norms = np.linalg.norm(g, axis=1)
    units = np.where(norms[:, None] > 0, g / np.where(norms > 0, norms, 1.0)[:, None], 0.0)
    p = np.ones(len(g)) if preferences is None else np.asarray(preferences, np.float64)
    x = np.linalg.pinv(units, rcond=max(units.shape) * np.finfo(np.float64).eps) @ p
    size = np.linalg.norm(x)
    if size == 0:
        return np.zeros(g.shape[1])
    unit = x / size
    return np.sum(g @ unit) * unit


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(ConFIG, OPTIONS)
    asserts.assert_gradient_options(ConFIG, default_head_update="full")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(ConFIG)
    with pytest.raises(ValueError, match="preferences"):
        ConFIG(preferences=[1.0, 0.0])


def test_head_weights():
    asserts.assert_head_weights(ConFIG)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    asserts.assert_permutation_equivariant(
        make(ConFIG), gram, rng.uniform(0.1, 3.0, num_tasks), rng.permutation(num_tasks), engine
    )


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    asserts.assert_scale_invariant(make(ConFIG), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(ConFIG), num_tasks, engine, zero_weight=0.0)
    asserts.assert_nan_for_non_finite_gram(make(ConFIG), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(ConFIG), [[4.0]], engine=engine), [1.0], rtol=1e-6)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(ConFIG), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(ConFIG, torch_ops, ["random", "aligned", "mixed"], (1, 2, 3, 10, 40), rtol=1e-4)


def test_float64_keras_ops_path_is_float64_accurate():
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("config_float64_paths", asserts.assert_float64_paths_agree(ConFIG(), g @ g.T, rtol=1e-12))


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_equal_angles_and_projected_length(family, num_tasks, engine):
    """Independent gradients: cos(g_i, d) is the same for every task (and
    positive), and |d| = sum_i g_i . d / |d|."""
    g = gradients(family, num_tasks, 3)
    weights = weigh(make(ConFIG), gram_of(g), engine=engine).astype(np.float64)
    d = g.T @ weights
    cosines = g @ d / np.linalg.norm(g, axis=1) / np.linalg.norm(d)
    spread = (cosines.max() - cosines.min()) / cosines.max()
    measure(f"config_cosine_spread_{family}", spread)
    assert cosines.min() > 0 and spread <= 1e-5, cosines
    length = np.sum(g @ d) / np.linalg.norm(d)
    assert abs(np.linalg.norm(d) - length) <= 1e-5 * length


@pytest.mark.parametrize("family", ["random", "aligned", "low_rank"])
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_agrees_with_the_paper_equation(family, num_tasks, engine):
    """The update against `reference` (float64, pseudo-inverse of U itself),
    also where U is exactly rank-deficient (low_rank: D = T // 3 < T)."""
    g = gradients(family, num_tasks, 5)
    weights = weigh(make(ConFIG), gram_of(g), engine=engine).astype(np.float64)
    expected = reference(g)
    error = np.linalg.norm(g.T @ weights - expected) / (np.abs(weights) @ np.linalg.norm(g, axis=1))
    measure(f"config_vs_equation_{family}", error)
    assert error <= 1e-5, error


def test_preferences_tilt_the_angles(engine):
    """With preferences p (by task name), cos(g_i, d) is proportional to p_i."""
    g = gradients("random", 3, 6)
    weighting = ConFIG(preferences={"c": 3.0, "a": 1.0, "b": 2.0})
    weighting.build(3, ["a", "b", "c"])
    weights = weigh(weighting, gram_of(g), engine=engine).astype(np.float64)
    cosines = g @ (g.T @ weights) / np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(cosines / cosines[0], [1.0, 2.0, 3.0], rtol=1e-5)
    expected = reference(g, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(g.T @ weights, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_zero_and_cancelling_gradients(engine):
    """A zero gradient gets weight 0 and changes nothing else; gradients
    whose unit vectors cancel (u_1 = -u_2, p = 1) give a zero update."""
    g = gradients("random", 3, 1)
    with_zero = np.concatenate([g, np.zeros((1, g.shape[1]))])
    weights = weigh(make(ConFIG), gram_of(with_zero), engine=engine)
    assert weights[-1] == 0.0
    np.testing.assert_allclose(weights[:3], weigh(make(ConFIG), gram_of(g), engine=engine), rtol=1e-5)
    opposite = np.array([[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0]])
    np.testing.assert_array_equal(weigh(make(ConFIG), gram_of(opposite), engine=engine), [0.0, 0.0])


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's ConFIG aggregator on the Jacobian (independent gradients in
    R^20; it takes the pseudo-inverse of U itself) against our update
    G^T w from the Gramian alone: the same vector."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    expected = aggregation.ConFIG()(torch.from_numpy(g)).numpy()
    for dtype, path, rtol in (("float64", "numpy", 1e-12), ("float32", "keras", 1e-5)):
        weights = weigh_in(ConFIG(), gram.astype(dtype).astype(np.float64), dtype, path)
        error = np.abs(g.T @ weights - expected).max() / np.abs(expected).max()
        measure(f"config_vs_torchjd_{dtype}", error)
        assert error <= rtol, (dtype, error)
