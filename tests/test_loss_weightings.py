"""Properties of the loss-based weightings (Static, Uncertainty, GradNorm,
DWA, LBTW, DTP), called directly on losses (and Gram matrices)."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_mgda as km


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def _f32(x):
    return ops.convert_to_tensor(np.asarray(x, dtype="float32"))


def _built(weighting, num_tasks, names=None):
    weighting.build(num_tasks, names)
    return weighting


# Static ---------------------------------------------------------------------


def test_static_weights_are_the_given_ones_in_task_order():
    w = _built(km.weighting.Static({"b": 0.25, "a": 2.0}), 2, ["a", "b"])
    np.testing.assert_allclose(_np(w(_f32([3.0, 4.0]))), [2.0, 0.25])
    w = _built(km.weighting.Static([0.1, 0.2, 0.7]), 3)
    np.testing.assert_allclose(_np(w(_f32([1.0, 1.0, 1.0]))), [0.1, 0.2, 0.7], rtol=1e-6)


@pytest.mark.parametrize(
    "weights, names, message",
    [
        ([1.0, 2.0], ["a", "b", "c"], "has 2 values but the model has 3 tasks"),
        ({"a": 1.0}, ["a", "b"], "missing \\['b'\\]"),
        ({"a": 1.0, "b": 1.0, "zz": 1.0}, ["a", "b"], "unknown \\['zz'\\]"),
    ],
)
def test_static_rejects_weights_that_do_not_match_the_tasks(weights, names, message):
    with pytest.raises(ValueError, match=message):
        km.weighting.Static(weights).build(len(names), names)


@pytest.mark.parametrize("bad", [[1.0, -0.5], [float("nan"), 1.0]])
def test_static_rejects_negative_or_nan_weights(bad):
    with pytest.raises(ValueError, match="non-negative"):
        km.weighting.Static(bad)


# Uncertainty ----------------------------------------------------------------


def test_uncertainty_weights_are_one_over_two_sigma_squared():
    w = _built(km.weighting.Uncertainty(), 3)
    log_variances = np.array([0.0, np.log(4.0), -1.0], dtype="float32")
    w.log_variances.assign(log_variances)
    sigma2 = np.exp(log_variances)
    np.testing.assert_allclose(_np(w(_f32([1.0, 2.0, 3.0]))), 1 / (2 * sigma2), rtol=1e-6)
    # Its objective: sum L / (2 sigma^2) + log sigma.
    losses = np.array([1.0, 2.0, 3.0])
    expected = np.sum(losses / (2 * sigma2) + 0.5 * np.log(sigma2))
    np.testing.assert_allclose(_np(w.loss(_f32(losses))), expected, rtol=1e-6)


def test_uncertainty_learns_sigma_squared_equal_to_each_loss():
    """Minimising its objective for fixed losses drives sigma_t^2 to L_t
    (the stationary point of L/(2 s) + log(s)/2)."""
    w = _built(km.weighting.Uncertainty(), 2)
    losses = np.array([0.5, 4.0])
    s = np.zeros(2)
    for _ in range(2000):  # gradient descent with the analytic derivative
        w.log_variances.assign(s.astype("float32"))
        grad = 0.5 * (1.0 - np.exp(-s) * losses)
        s = s - 0.1 * grad
    np.testing.assert_allclose(np.exp(s), losses, rtol=1e-3)
    np.testing.assert_allclose(_np(w(_f32(losses))), 1 / (2 * losses), rtol=2e-3)


# GradNorm -------------------------------------------------------------------


def _gradnorm_objective(raw, gram, losses, initial, alpha):
    """GradNorm's L_grad in numpy, with the target held constant."""
    raw = np.maximum(raw, 0)
    weights = raw * len(raw) / raw.sum()
    norms = np.sqrt(np.diag(gram))
    weighted = weights * norms
    ratios = losses / initial
    target = weighted.mean() * (ratios / ratios.mean()) ** alpha
    return np.abs(weighted - target).sum(), weights


def test_gradnorm_weights_sum_to_the_number_of_tasks():
    rng = np.random.default_rng(0)
    for num_tasks in (1, 2, 5, 40):
        w = _built(km.weighting.GradNorm(), num_tasks)
        w.raw_weights.assign(rng.uniform(0.1, 3.0, num_tasks).astype("float32"))
        weights = _np(w(_f32(rng.uniform(0.5, 2, num_tasks))))
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(), num_tasks, rtol=1e-5)


def test_gradnorm_objective_matches_the_paper():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 7))
    gram = g @ g.T
    w = _built(km.weighting.GradNorm(alpha=1.5), 3)
    raw = np.array([0.5, 1.0, 2.0])
    w.raw_weights.assign(raw.astype("float32"))
    initial = np.array([2.0, 1.0, 3.0])
    w(_f32(initial))  # the first call records L(0)
    losses = np.array([1.0, 0.9, 2.5])
    weights = _np(w(_f32(losses)))
    expected_loss, expected_weights = _gradnorm_objective(raw, gram, losses, initial, 1.5)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)
    np.testing.assert_allclose(
        _np(w.loss(_f32(losses), _f32(gram))), expected_loss, rtol=1e-4
    )


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    """Equal training rates, task 0's gradient 3x larger: a descent step on
    the GradNorm objective moves weight from task 0 to task 1."""
    gram = np.diag([9.0, 1.0])
    losses = np.array([1.0, 1.0])
    raw = np.array([1.0, 1.0])
    base, _ = _gradnorm_objective(raw, gram, losses, losses, 1.5)
    # Finite differences of the numpy objective: the descent direction.
    grad = np.array(
        [
            (_gradnorm_objective(raw + h, gram, losses, losses, 1.5)[0] - base) / 1e-6
            for h in np.eye(2) * 1e-6
        ]
    )
    assert grad[0] > 0 > grad[1]
    w = _built(km.weighting.GradNorm(), 2)
    w(_f32(losses))
    np.testing.assert_allclose(_np(w.loss(_f32(losses), _f32(gram))), base, rtol=1e-5)


# DWA ------------------------------------------------------------------------


def _epoch(weighting, per_step_losses):
    seen = []
    for losses in per_step_losses:
        seen.append(_np(weighting(_f32(losses))))
    weighting.on_epoch_end(len(seen))
    return seen


def test_dwa_is_one_for_two_epochs_then_the_softmax_of_loss_ratios():
    w = _built(km.weighting.DWA(temperature=2.0), 3)
    first = _epoch(w, [[2.0, 1.0, 4.0], [4.0, 3.0, 4.0]])  # means 3, 2, 4
    second = _epoch(w, [[1.5, 2.0, 1.0], [1.5, 2.0, 3.0]])  # means 1.5, 2, 2
    for weights in first + second:
        np.testing.assert_allclose(weights, np.ones(3))
    third = _np(w(_f32([9.0, 9.0, 9.0])))
    ratios = np.array([1.5 / 3.0, 2.0 / 2.0, 2.0 / 4.0])
    expected = 3 * np.exp(ratios / 2.0) / np.exp(ratios / 2.0).sum()
    np.testing.assert_allclose(third, expected, rtol=1e-5)
    np.testing.assert_allclose(third.sum(), 3.0, rtol=1e-6)
    # A task whose loss fell least (ratio 1) gets the largest weight.
    assert np.argmax(third) == 1


def test_dwa_temperature_flattens_the_weights():
    weights = {}
    for temperature in (0.5, 100.0):
        w = _built(km.weighting.DWA(temperature=temperature), 2)
        _epoch(w, [[1.0, 1.0]])
        _epoch(w, [[0.2, 1.0]])
        weights[temperature] = _np(w(_f32([1.0, 1.0])))
    assert abs(weights[100.0][0] - 1.0) < 0.01
    assert weights[0.5][1] > weights[100.0][1] > 1.0


# LBTW -----------------------------------------------------------------------


def test_lbtw_is_the_loss_ratio_to_the_first_batch_of_the_epoch_to_alpha():
    w = _built(km.weighting.LBTW(alpha=0.5), 2)
    np.testing.assert_allclose(_np(w(_f32([4.0, 2.0]))), [1.0, 1.0])
    np.testing.assert_allclose(_np(w(_f32([1.0, 2.0]))), [0.5, 1.0], rtol=1e-6)
    w.on_epoch_end(0)
    # A new epoch: its first batch is the new reference.
    np.testing.assert_allclose(_np(w(_f32([1.0, 8.0]))), [1.0, 1.0])
    np.testing.assert_allclose(_np(w(_f32([0.25, 2.0]))), [0.5, 0.5], rtol=1e-6)


def test_lbtw_can_keep_the_first_batch_of_training():
    w = _built(km.weighting.LBTW(alpha=1.0, reset_each_epoch=False), 1)
    w(_f32([10.0]))
    w.on_epoch_end(0)
    np.testing.assert_allclose(_np(w(_f32([2.0]))), [0.2], rtol=1e-6)


def test_lbtw_alpha_zero_is_uniform():
    w = _built(km.weighting.LBTW(alpha=0.0), 3)
    w(_f32([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(_np(w(_f32([0.1, 5.0, 0.0]))), np.ones(3))


# DTP ------------------------------------------------------------------------


def _focal(kappa, gamma):
    return -((1 - kappa) ** gamma) * np.log(kappa)


def test_dtp_default_kpi_is_a_moving_average_of_exp_minus_loss():
    w = _built(km.weighting.DTP(gamma=2.0, smoothing=0.75), 2)
    first = np.array([0.1, 2.0])
    np.testing.assert_allclose(
        _np(w(_f32(first))), _focal(np.exp(-first), 2.0), rtol=1e-5
    )
    second = np.array([0.3, 1.0])
    kappa = 0.75 * np.exp(-first) + 0.25 * np.exp(-second)
    weights = _np(w(_f32(second)))
    np.testing.assert_allclose(weights, _focal(kappa, 2.0), rtol=1e-5)
    # The harder task (lower KPI) has priority.
    assert weights[1] > weights[0]


def test_dtp_reads_kpis_from_the_epoch_logs():
    w = _built(
        km.weighting.DTP(gamma=1.0, smoothing=0.5, kpi={"a": "a_acc", "b": "val_b_acc"}),
        2,
        ["a", "b"],
    )
    np.testing.assert_allclose(_np(w(_f32([1.0, 1.0]))), [1.0, 1.0])
    w.on_epoch_end(0, {"a_acc": 0.9, "val_b_acc": 0.4})
    np.testing.assert_allclose(
        _np(w(_f32([1.0, 1.0]))), _focal(np.array([0.9, 0.4]), 1.0), rtol=1e-5
    )
    w.on_epoch_end(1, {"a_acc": 0.5, "val_b_acc": 0.6})
    np.testing.assert_allclose(
        _np(w(_f32([1.0, 1.0]))), _focal(np.array([0.7, 0.5]), 1.0), rtol=1e-5
    )
    with pytest.raises(KeyError, match="val_b_acc"):
        w.on_epoch_end(2, {"a_acc": 0.5})


def test_dtp_weights_stay_finite_for_perfect_and_hopeless_tasks():
    w = _built(km.weighting.DTP(), 3)
    weights = _np(w(_f32([0.0, 1e6, 1.0])))
    assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
    assert weights[0] == 0.0 and weights[1] > weights[2]


# Shared ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "weighting",
    [
        km.weighting.Static([0.3, 0.7]),
        km.weighting.Uncertainty(initial_log_variance=0.5),
        km.weighting.GradNorm(alpha=0.5, mode="parameters"),
        km.weighting.DWA(temperature=3.0),
        km.weighting.LBTW(alpha=0.2, reset_each_epoch=False),
        km.weighting.DTP(gamma=2.0, smoothing=0.5, kpi={"a": "x", "b": "y"}),
    ],
    ids=lambda w: type(w).__name__,
)
def test_config_round_trip(weighting):
    config = keras.saving.serialize_keras_object(weighting)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(weighting)
    assert restored.get_config() == weighting.get_config()


def test_a_weighting_that_skips_the_base_init_gets_a_clear_error():
    class Forgetful(km.weighting.Weighting):
        def __init__(self):
            pass

        def call(self, losses, gram=None):
            return losses

    with pytest.raises(TypeError, match="super\\(\\).__init__"):
        km.weighting.get(Forgetful())
