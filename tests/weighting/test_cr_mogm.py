"""CR-MOGM (Zhou et al. 2022): w_k = alpha w_{k-1} + (1 - alpha) w_hat_k, w_1 =
w_hat_1, over any wrapped weighting's weights w_hat (torchjd's
`CRMOGMWeighting`).

Checked: the config, with the wrapped weighting's own config nested, and
Keras serialisation; the options and properties it takes from the wrapped
weighting (Gram matrix, gradient space, head weights, own objective,
epoch and after-update hooks); the moving average against a NumPy loop,
over a stateless Gram weighting (MGDA) and a stateful random one (RLW,
its twin drawing the same weights); alpha 0 and 1; non-finite weights
leave the average; torchjd's CRMOGMWeighting over UPGrad (torch).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mgda import weighting as weighting_lib
from keras_mgda.weighting.cr_mogm import CRMOGM
from keras_mgda.weighting.dwa import DWA
from keras_mgda.weighting.extensions import GradientAggregator
from keras_mgda.weighting.famo import FAMO
from keras_mgda.weighting.imtl_l import IMTLL
from keras_mgda.weighting.mgda import MGDA
from keras_mgda.weighting.nash_mtl import NashMTL
from keras_mgda.weighting.rlw import RLW
from keras_mgda.weighting.upgrad import UPGrad

from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned


def built(inner, num_tasks=3, **options):
    weighting = CRMOGM(inner, **options)
    weighting.build(num_tasks, [f"t{i}" for i in range(num_tasks)])
    return weighting


def smoothed(fresh, alpha):
    """The moving average of a sequence of weight vectors, in NumPy."""
    out, previous = [], None
    for w in fresh:
        previous = w if previous is None else alpha * previous + (1 - alpha) * w
        out.append(previous)
    return out


def test_config_round_trip():
    weighting = CRMOGM(NashMTL(max_norm=2.0), alpha=0.5)
    config = weighting.get_config()
    assert config["alpha"] == 0.5 and config["weighting"]["class_name"] == "NashMTL"
    assert config["weighting"]["config"]["max_norm"] == 2.0
    for clone in (CRMOGM.from_config(config), weighting_lib.get(keras.saving.serialize_keras_object(weighting))):
        assert type(clone) is CRMOGM and clone.get_config() == config
        assert type(clone.inner) is NashMTL and clone.inner.max_norm == 2.0
    assert type(CRMOGM().inner) is MGDA  # the default
    assert type(CRMOGM("upgrad").inner) is UPGrad
    assert repr(weighting).startswith("CRMOGM(")
    with pytest.raises(ValueError, match="alpha"):
        CRMOGM(alpha=1.5)

    class Mean(GradientAggregator):
        def aggregate(self, gradients, losses, gram, ops=keras.ops):
            return [ops.mean(g, axis=0) for g in gradients], ops.ones_like(losses)

    with pytest.raises(TypeError, match="aggregates"):
        CRMOGM(Mean())


def test_takes_the_wrapped_weightings_options():
    gram_based = CRMOGM(MGDA(mode="parameters"))
    assert gram_based.requires_gram and gram_based.gradient_space == "parameters"
    loss_based = CRMOGM(IMTLL())
    assert not loss_based.requires_gram and loss_based.gradient_space == "representation"
    assert CRMOGM(FAMO()).needs_losses_after_update and not CRMOGM(MGDA()).needs_losses_after_update
    assert CRMOGM(DWA()).has_epoch_hook and not CRMOGM(MGDA()).has_epoch_hook
    # The heads: NashMTL's head weights (unclipped alpha) of the smoothed weights.
    nash = built(NashMTL())
    weights = ops.convert_to_tensor(np.array([0.5, 2.0, 3.0], np.float32))
    np.testing.assert_allclose(
        ops.convert_to_numpy(nash.head_weights(weights)), np.array([0.5, 2.0, 3.0]) * np.sqrt(3), rtol=1e-6
    )
    # The wrapped weighting's objective and its trainable state.
    imtll = built(IMTLL())
    assert [v.path for v in imtll.trainable_variables] == [v.path for v in imtll.inner.trainable_variables]
    np.testing.assert_allclose(ops.convert_to_numpy(imtll.loss(ops.convert_to_tensor([1.0, 2.0, 3.0]))), 6.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_average_of_a_gram_weighting(alpha):
    grams = [gram_of(gradients("random", 3, seed)) for seed in range(6)]
    fresh = [weigh(MGDA(), gram).astype(np.float64) for gram in grams]
    weighting = built(MGDA(), alpha=alpha)
    for step, (gram, expected) in enumerate(zip(grams, smoothed(fresh, alpha))):
        error = np.abs(weigh(weighting, gram) - expected).max()
        measure("crmogm_vs_numpy", error)
        assert error <= 1e-6, (step, error)


def test_average_of_a_stateful_random_weighting():
    """RLW's draws: the twin RLW(seed=4) draws the same weights the wrapped
    one does; the wrapped one's seed state is carried through the wrapper."""
    twin = RLW(seed=4)
    fresh = [weigh(twin, np.eye(3)).astype(np.float64) for _ in range(5)]
    weighting = built(RLW(seed=4), alpha=0.7)
    assert id(weighting.inner.seed_generator.state) in {id(v) for v in weighting.non_trainable_variables}
    for step, expected in enumerate(smoothed(fresh, 0.7)):
        np.testing.assert_allclose(weigh(weighting, np.eye(3)), expected, rtol=1e-6, err_msg=str(step))


def test_non_finite_weights_leave_the_average():
    weighting = built(MGDA(), alpha=0.5)
    gram = gram_of(gradients("random", 3, 1))
    first = weigh(weighting, gram)
    bad = gram.copy()
    bad[0, 1] = bad[1, 0] = np.nan
    assert np.all(np.isnan(weigh(weighting, bad)))
    np.testing.assert_array_equal(ops.convert_to_numpy(weighting.average), first)
    assert float(ops.convert_to_numpy(weighting.started)) == 1.0


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
def test_agrees_with_torchjd():
    """torchjd's CRMOGMWeighting(UPGradWeighting(), alpha) on the same
    Gramians (independent gradients in R^20; its UPGrad without the ridge
    reg_eps, as in test_upgrad.py): the same smoothed weights."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")
    from torchjd.linalg import QuadprogProjector

    projector = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)
    theirs = aggregation.CRMOGMWeighting(aggregation.UPGradWeighting(projector=projector), alpha=0.8)
    ours = built(UPGrad(), num_tasks=4, alpha=0.8)
    for seed in range(5):
        g = well_conditioned(4, seed)
        expected = theirs(torch.from_numpy(g @ g.T)).numpy()
        error = np.abs(weigh(ours, gram_of(g)) - expected).max() / np.abs(expected).max()
        measure("crmogm_vs_torchjd", error)
        assert error <= 1e-5, (seed, error)
