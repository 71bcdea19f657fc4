"""Scale-invariant linear scalarisation: the step follows sum_t log(L_t + eps),
w_t = 1 / (L_t + eps).

Checked (torchjd has no such scalarizer): the config; the weights against
the formula; the defining invariance (rescaling a loss leaves w_t L_t, so
the update, unchanged); a zero loss is a solved task (weight 0); a NaN,
infinite or negative loss gives NaN for that task.
"""

import numpy as np
import pytest

from keras_mgda.weighting.scale_invariant import ScaleInvariant

from . import _asserts as asserts
from ._calling import weigh


def loss_weights(weighting, losses):
    losses = np.asarray(losses, np.float32)
    return weigh(weighting, np.eye(len(losses)), losses)


def test_config_round_trip():
    asserts.assert_config_round_trip(ScaleInvariant, {"epsilon": 1e-6})
    assert not ScaleInvariant.requires_gram
    with pytest.raises(ValueError, match="epsilon"):
        ScaleInvariant(epsilon=-1.0)


@pytest.mark.parametrize("num_tasks", [1, 3, 40])
def test_weights_are_inverse_losses(num_tasks):
    losses = np.exp(np.random.default_rng(num_tasks).uniform(-9, 9, num_tasks)).astype(np.float32)
    expected = 1.0 / (losses.astype(np.float64) + 1e-8)
    np.testing.assert_allclose(loss_weights(ScaleInvariant(), losses), expected, rtol=1e-6)


def test_update_is_invariant_to_rescaling_a_loss():
    """Exactly with epsilon 0 (1e-8 moves a loss of 3e-4 by 3e-5 relative)."""
    losses = np.array([0.3, 2.0, 7.0], np.float32)
    scales = np.array([1e-3, 1.0, 1e4], np.float32)
    base = loss_weights(ScaleInvariant(epsilon=0.0), losses)
    scaled = loss_weights(ScaleInvariant(epsilon=0.0), losses * scales)
    np.testing.assert_allclose(scaled * scales, base, rtol=1e-6)


def test_degenerate_losses():
    """A loss at most epsilon is a solved task: weight 0 (the guard alone
    gave 1e8); NaN, infinite or negative: NaN for that task."""
    weights = loss_weights(ScaleInvariant(), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(weights, [0.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(loss_weights(ScaleInvariant(epsilon=0.0), [0.0, 1e-30, 2.0])[:2], [0.0, 1e30], rtol=1e-6)
    for bad in (np.nan, np.inf, -1.0):
        weights = loss_weights(ScaleInvariant(), [bad, 1.0, 2.0])
        assert np.isnan(weights[0]) and np.all(np.isfinite(weights[1:])), (bad, weights)
