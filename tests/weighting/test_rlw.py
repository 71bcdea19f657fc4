"""RLW (Lin et al. 2022): every step, w = softmax(x) with x_t standard normal
draws from the weighting's seed generator.

Checked: the config; the weights are positive, sum to 1 and ignore the
losses; a seed fixes the sequence, which a copy of the seed state
continues; the distribution of the draws against NumPy's softmax of
normal draws (two-sample Kolmogorov-Smirnov test, every component); and,
on torch, torchjd's `Random` seeded with the very seed Keras's generator
passes to torch: the same draws, bit for bit.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.rlw import RLW

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh


def draw(weighting, losses):
    losses = np.asarray(losses, np.float32)
    return weigh(weighting, np.eye(len(losses)), losses)


def built(seed, num_tasks=3):
    weighting = RLW(seed=seed)
    weighting.build(num_tasks)
    return weighting


def test_config_round_trip():
    asserts.assert_config_round_trip(RLW, {"seed": 3})
    assert not RLW.requires_gram


def test_weights_are_on_the_simplex_and_ignore_the_losses():
    first, second = built(1), built(1)
    for step in range(5):
        a = draw(first, [1.0, 2.0, 3.0])
        b = draw(second, [1e6, np.nan, 0.0])
        np.testing.assert_array_equal(a, b)
        assert np.all(a > 0) and abs(a.sum() - 1) <= 1e-6, (step, a)


def test_seed_fixes_the_sequence_and_its_state_resumes_it():
    weighting = built(11)
    sequence = [draw(weighting, np.ones(3)) for _ in range(4)]
    assert not np.allclose(sequence[0], sequence[1])
    again = built(11)
    np.testing.assert_array_equal(draw(again, np.ones(3)), sequence[0])
    resumed = built(11)
    resumed.seed_generator.state.assign(ops.convert_to_numpy(again.seed_generator.state))
    np.testing.assert_array_equal(draw(resumed, np.ones(3)), sequence[1])
    other = built(12)
    assert not np.allclose(draw(other, np.ones(3)), sequence[0])


def test_distribution_matches_softmax_of_normal_draws():
    """Every component of 400 draws against 4000 NumPy softmax(normal)
    draws: two-sample KS test at level 1e-3 (seeded: deterministic)."""
    stats = pytest.importorskip("scipy.stats")
    weighting = built(5, num_tasks=4)
    ours = np.stack([draw(weighting, np.ones(4)) for _ in range(400)])
    x = np.random.default_rng(0).standard_normal((4000, 4))
    reference = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    for task in range(4):
        result = stats.ks_2samp(ours[:, task], reference[:, task])
        measure("rlw_ks_statistic", result.statistic)
        assert result.pvalue > 1e-3, (task, result)
    np.testing.assert_allclose(ours.mean(axis=0), 0.25, atol=0.03)


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
def test_agrees_with_torchjd_seeded_alike():
    """Keras's torch backend draws from a torch.Generator seeded with
    first + second of the generator's state; torchjd's `Random` draws
    torch.randn from the global generator: seeded with that same integer,
    the gradient of its output with respect to the losses is our weights,
    bit for bit."""
    torch = pytest.importorskip("torch")
    scalarization = pytest.importorskip("torchjd.scalarization")
    weighting = built(7, num_tasks=5)
    for _ in range(3):
        state = np.asarray(ops.convert_to_numpy(weighting.seed_generator.state))
        ours = draw(weighting, np.ones(5))
        torch.manual_seed(int(state[0] + state[1]) & 0xFFFFFFFF)
        values = torch.ones(5, requires_grad=True)
        scalarization.Random()(values).backward()
        np.testing.assert_array_equal(ours, values.grad.numpy())
