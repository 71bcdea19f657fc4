"""IMTL (Liu et al. 2021), the hybrid: learned loss scales e^{s_t} (IMTL-L)
and IMTL-G's impartial combination of the scaled losses' gradients
e^{s_t} g_t; the weights of the raw losses are w_t = alpha_t e^{s_t}.

Checked: the config and options; with s = 0, IMTL-G's weights bit for bit;
with random s, the paper's closed form on the scaled gradients (LibMTL's
`IMTL`, in NumPy) and torchjd's IMTL-G aggregator on the scaled Jacobian
(torch); the defining properties: the update has equal projections on
every unit gradient, and the scales change its length only (its direction
is IMTL-G's on the raw gradients); the heads' weights; the scales'
objective; degenerate and non-finite Gram matrices; scale invariance.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.imtl import IMTLG
from keras_mgda.weighting.imtl_hybrid import IMTL

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned


def built(num_tasks, log_scales=None, **options):
    weighting = IMTL(**options)
    weighting.build(num_tasks)
    if log_scales is not None:
        weighting.log_scales.assign(np.asarray(log_scales, np.float32))
    return weighting


def paper_weights(g, log_scales):
    """The paper's closed form (LibMTL's `IMTL`) on the scaled gradients
    G' = diag(e^s) G: alpha_{2:T} = g'_1 U^T (D U^T)^-1, alpha_1 = 1 - sum;
    the raw losses' weights are alpha e^s. float64."""
    scales = np.exp(np.asarray(log_scales, np.float64))
    scaled = g * scales[:, None]
    unit = scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
    d = scaled[0] - scaled[1:]
    u = unit[0] - unit[1:]
    rest = scaled[0] @ u.T @ np.linalg.inv(d @ u.T)
    return np.concatenate([[1.0 - rest.sum()], rest]) * scales


def test_config_round_trip():
    asserts.assert_config_round_trip(IMTL, {"mode": "parameters", "head_update": "scaled", "initial_log_scale": 0.5})
    asserts.assert_gradient_options(IMTL, default_head_update="full")
    asserts.assert_invalid_options_raise(IMTL)


def test_zero_scales_are_imtlg():
    gram = gram_of(gradients("random", 4, 3))
    np.testing.assert_array_equal(weigh(built(4), gram), weigh(IMTLG(), gram))


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 10])
def test_agrees_with_the_paper_closed_form(num_tasks):
    rng = np.random.default_rng(num_tasks)
    for seed in range(3):
        g = well_conditioned(num_tasks, seed)
        log_scales = rng.uniform(-2, 2, num_tasks).astype(np.float32)
        weights = weigh(built(num_tasks, log_scales), gram_of(g)).astype(np.float64)
        expected = paper_weights(g, log_scales)
        sign = np.sign(np.sum(expected / np.exp(log_scales)))  # ours: sum alpha = +-1, see IMTLG
        error = np.abs(weights - sign * expected).max() / np.abs(expected).max()
        measure("imtl_vs_paper_numpy", error)
        assert error <= 2e-5, (seed, error)


def test_equal_projections_and_the_direction_of_imtlg():
    g = well_conditioned(5, 4)
    log_scales = np.array([-1.5, 0.0, 0.5, 2.0, -0.3], np.float32)
    weights = weigh(built(5, log_scales), gram_of(g)).astype(np.float64)
    update = g.T @ weights
    projections = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ update
    np.testing.assert_allclose(projections, projections.mean(), rtol=1e-4)
    np.testing.assert_allclose(np.sum(weights * np.exp(-log_scales.astype(np.float64))), 1.0, rtol=1e-5)
    direction = g.T @ weigh(IMTLG(), gram_of(g)).astype(np.float64)
    cosine = update @ direction / np.linalg.norm(update) / np.linalg.norm(direction)
    assert cosine > 1 - 1e-6, cosine


def test_head_weights_and_objective():
    log_scales = np.array([0.5, -1.0, 0.0], np.float32)
    weights = ops.convert_to_tensor(np.array([0.2, 0.3, 0.5], np.float32))
    head = built(3, log_scales).head_weights(weights)
    np.testing.assert_allclose(ops.convert_to_numpy(head), np.exp(log_scales), rtol=1e-6)
    scaled = built(3, log_scales, head_update="scaled").head_weights(weights)
    np.testing.assert_array_equal(ops.convert_to_numpy(scaled), ops.convert_to_numpy(weights))
    losses = np.array([1.0, 2.0, 3.0], np.float32)
    objective = ops.convert_to_numpy(built(3, log_scales).loss(ops.convert_to_tensor(losses)))
    np.testing.assert_allclose(objective, np.sum(np.exp(log_scales) * losses - log_scales), rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_degenerate_and_non_finite_grams(num_tasks):
    log_scales = np.linspace(-1, 1, num_tasks).astype(np.float32)
    weighting = built(num_tasks, log_scales)
    uniform = np.exp(log_scales) / num_tasks  # IMTL-G's 1/T for M = 0, times e^s
    asserts.assert_finite_on_degenerate_grams(weighting, num_tasks, "keras", zero_weight=uniform)
    asserts.assert_nan_for_non_finite_gram(weighting, num_tasks, "keras")


def test_scale_invariance():
    asserts.assert_scale_invariant(built(3, [0.3, -0.2, 1.0]), gram_of(gradients("random", 3, 8)), "keras")


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks", [2, 3, 6, 10])
def test_agrees_with_torchjd(num_tasks):
    """torchjd's IMTL-G aggregator on the IMTL-L-scaled Jacobian
    diag(e^s) G is our update G^T w (torchjd composes the two halves by
    hand: `IMTLL` scales the losses, `IMTLG` aggregates their Jacobian)."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(num_tasks + 100)
    for seed in range(2):
        g = well_conditioned(num_tasks, seed)
        log_scales = rng.uniform(-2, 2, num_tasks).astype(np.float32)
        scaled = torch.from_numpy(g * np.exp(log_scales.astype(np.float64))[:, None])
        expected = aggregation.IMTLG()(scaled).numpy()
        weights = weigh(built(num_tasks, log_scales), gram_of(g)).astype(np.float64)
        update = g.T @ weights
        update = update * np.sign(update @ expected)  # ours: the negated case, see IMTLG
        error = np.abs(update - expected).max() / np.abs(expected).max()
        measure("imtl_vs_torchjd", error)
        assert error <= 2e-5, (seed, error)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(built(3, [0.3, -0.2, 1.0]), gram_of(gradients("random", 3, 4)))


def test_numpy_namespace_agrees():
    """`call(..., ops=numpy_ops)` (the host namespace) gives the keras.ops
    weights, with learned scales."""
    gram = gram_of(gradients("random", 3, 4))
    weighting = built(3, log_scales=[0.5, -1.0, 0.25])
    asserts.assert_float64_paths_agree(weighting, gram, rtol=1e-9)
