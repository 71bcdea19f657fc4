"""IMTL-L (Liu et al. 2021): learned log-scales s, objective
sum_t (e^{s_t} L_t - s_t), weights e^{s_t}.

Checked: the config; against torchjd's IMTLL with the same scales: the
weights (its output's gradient with respect to the losses), the objective
and its gradient with respect to the scales; the defining property: for
fixed losses, descending the objective drives every scaled loss
e^{s_t} L_t to 1, whatever the losses' scales.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.imtl_l import IMTLL

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh


def built(num_tasks, log_scales=None):
    weighting = IMTLL()
    weighting.build(num_tasks)
    if log_scales is not None:
        weighting.log_scales.assign(np.asarray(log_scales, np.float32))
    return weighting


def test_config_round_trip():
    asserts.assert_config_round_trip(IMTLL, {"initial_log_scale": 0.5})
    assert not IMTLL.requires_gram
    weighting = IMTLL(initial_log_scale=0.5)
    weighting.build(2)
    assert [v.trainable for v in weighting.variables] == [True]
    np.testing.assert_allclose(ops.convert_to_numpy(weighting.log_scales), [0.5, 0.5])


def test_weights_and_objective():
    log_scales = np.array([0.0, np.log(4.0), -1.0], np.float32)
    losses = np.array([1.0, 2.0, 3.0], np.float32)
    weighting = built(3, log_scales)
    np.testing.assert_allclose(weigh(weighting, np.eye(3), losses), np.exp(log_scales), rtol=1e-6)
    expected = np.sum(np.exp(log_scales) * losses - log_scales)
    np.testing.assert_allclose(ops.convert_to_numpy(weighting.loss(ops.convert_to_tensor(losses))), expected, rtol=1e-6)


def test_scaled_losses_tend_to_one():
    """Gradient descent on s with the analytic derivative e^s L - 1 (the
    objective's): e^{s_t} L_t -> 1 for losses 1e-3 to 1e3."""
    losses = np.array([1e-3, 1.0, 1e3])
    s = np.zeros(3)
    for _ in range(3000):
        s = s - 0.1 * np.minimum(np.exp(s) * losses - 1.0, 10.0)
    weighting = built(3, s)
    np.testing.assert_allclose(weigh(weighting, np.eye(3), losses) * losses, 1.0, rtol=1e-3)


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
def test_agrees_with_torchjd():
    """torchjd's IMTLL with the same log-scales: its output's gradient with
    respect to the losses is our weights; its output is our objective and
    its gradient with respect to the scales is ours."""
    torch = pytest.importorskip("torch")
    scalarization = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(0)
    for num_tasks in (2, 5, 40):
        log_scales = rng.uniform(-2, 2, num_tasks).astype(np.float32)
        losses = np.exp(rng.uniform(-3, 3, num_tasks)).astype(np.float32)
        theirs = scalarization.IMTLL(num_tasks)
        with torch.no_grad():
            theirs.log_scale.copy_(torch.from_numpy(log_scales))
        values = torch.tensor(losses, requires_grad=True)
        objective = theirs(values)
        objective.backward()
        ours = built(num_tasks, log_scales)
        weights = weigh(ours, np.eye(num_tasks), losses)
        own = ours.loss(torch.tensor(losses))
        own.backward()
        scale_grad = ours.log_scales.value.grad.cpu().numpy()
        errors = (
            np.abs(weights / values.grad.numpy() - 1).max(),
            abs(float(own.detach()) / float(objective.detach()) - 1),
            np.abs(scale_grad - theirs.log_scale.grad.numpy()).max() / np.abs(theirs.log_scale.grad.numpy()).max(),
        )
        measure("imtll_vs_torchjd", max(errors))
        assert max(errors) <= 1e-5, errors
