"""GLS (Chennupati et al. 2019): the step follows the geometric mean of the
losses, (prod_t (L_t + eps))^(1/T), so w_t = GM / (T (L_t + eps)).

Checked: the config; torchjd's GeometricMean (the gradient of its output
with respect to the losses) on random losses spread over 8 orders of
magnitude; the defining invariance (rescaling one loss rescales the
update by a common factor only); equal losses give 1/T; huge and tiny
losses (products that overflow float32) stay finite; a zero loss is a
solved task (weight 0, the others weighed among themselves), a NaN,
infinite or negative loss gives NaN weights.
"""

import numpy as np
import pytest

from keras_mgda.weighting.gls import GLS

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh


def loss_weights(weighting, losses):
    losses = np.asarray(losses, np.float32)
    return weigh(weighting, np.eye(len(losses)), losses)


def reference(losses, epsilon=1e-8):
    """d/dL (prod (L + eps))^(1/T), in float64."""
    shifted = np.asarray(losses, np.float64) + epsilon
    return np.exp(np.mean(np.log(shifted))) / (len(shifted) * shifted)


def random_losses(num_tasks, seed):
    rng = np.random.default_rng([seed, num_tasks])
    return np.exp(rng.uniform(np.log(1e-4), np.log(1e4), num_tasks)).astype(np.float32)


def test_config_round_trip():
    asserts.assert_config_round_trip(GLS, {"epsilon": 1e-6})
    assert not GLS.requires_gram
    with pytest.raises(ValueError, match="epsilon"):
        GLS(epsilon=-1.0)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 10, 40])
def test_weights_are_the_gradient_of_the_geometric_mean(num_tasks):
    for seed in range(3):
        losses = random_losses(num_tasks, seed)
        weights = loss_weights(GLS(), losses)
        error = np.abs(weights / reference(losses) - 1).max()
        measure("gls_vs_numpy", error)
        assert error <= 2e-5, error


def test_equal_losses_weigh_one_over_t():
    np.testing.assert_allclose(loss_weights(GLS(), [0.7] * 5), np.full(5, 0.2), rtol=1e-6)


def test_update_is_invariant_to_rescaling_a_loss():
    """L_t -> c_t L_t: w_t c_t = (prod c)^(1/T) w_t(L), the same direction
    (epsilon 0: exact invariance)."""
    losses = random_losses(4, 1)
    scales = np.array([1e-3, 2.0, 50.0, 1e3], np.float32)
    base = loss_weights(GLS(epsilon=0.0), losses)
    scaled = loss_weights(GLS(epsilon=0.0), losses * scales)
    common = np.exp(np.mean(np.log(scales.astype(np.float64))))
    np.testing.assert_allclose(scaled * scales / common, base, rtol=2e-5)


def test_products_that_overflow_stay_finite():
    """40 losses of 1e30 (their product overflows float64) and of 1e-30
    (with epsilon 0, so that they are not solved)."""
    for value in (1e30, 1e-30):
        weights = loss_weights(GLS(epsilon=0.0), np.full(40, value))
        np.testing.assert_allclose(weights, reference(np.full(40, value), epsilon=0.0), rtol=1e-5)


def test_degenerate_losses():
    """A zero loss (at most epsilon) is a solved task: weight 0, and the
    others are weighed by the geometric mean of their own losses (the
    guard alone gave it 7e4 times the others' weights); every loss
    solved: all 0. NaN, infinite or negative: NaN."""
    weights = loss_weights(GLS(), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(weights, np.concatenate([[0.0], reference([1.0, 2.0])]), rtol=1e-6)
    np.testing.assert_array_equal(loss_weights(GLS(), [0.0, 5e-9, 0.0]), np.zeros(3))
    for bad in (np.nan, np.inf, -1.0):
        assert np.all(np.isnan(loss_weights(GLS(), [bad, 1.0, 2.0]))), bad


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks", [2, 3, 10, 40])
def test_agrees_with_torchjd(num_tasks):
    """torchjd's GeometricMean, exp(mean log L), differentiated with respect
    to the losses: the same weights (compared with epsilon 0, as torchjd
    has none: 1e-8 moves a loss of 1e-4 by 1e-4 relative)."""
    torch = pytest.importorskip("torch")
    scalarization = pytest.importorskip("torchjd.scalarization")
    for seed in range(3):
        losses = random_losses(num_tasks, seed)
        values = torch.tensor(losses.astype(np.float64), requires_grad=True)
        scalarization.GeometricMean()(values).backward()
        expected = values.grad.numpy()
        error = np.abs(loss_weights(GLS(epsilon=0.0), losses) / expected - 1).max()
        measure("gls_vs_torchjd", error)
        assert error <= 2e-5, error
