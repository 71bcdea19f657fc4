"""ExcessMTL (He et al., ICML 2024): excess risks E_t = sum g_t^2 /
sqrt(S_t + 1e-7) with S_t the accumulated squared gradients; weights start
at 1, the first step records E(first), later ones w <- T softmax(log w +
eta E / E(first)); the update is sum_t w_t G_t.

Checked: the interface and options; a NumPy reference of the authors'
code over several steps in both modes (representation: batch sums of
dL_t/dZ); torchjd's ExcessMTLWeighting, whose weights differ on purpose
(it starts at 1/T and applies the raw first-step risk) by exactly that
factor; the loss scale divided out; and `fit` steps of the tiny model on
all backends against the NumPy reference.
"""

import keras
import numpy as np
import pytest

from keras_mgda.weighting.excess_mtl import ExcessMTL

from . import _asserts as asserts
from . import _tiny_model as tiny
from ._aggregating import aggregate
from ._aggregating import gram_of_gradients
from ._calling import BACKEND
from ._calling import measure

OPTIONS = {"robust_step_size": 0.5, "mode": "representation", "head_update": "full"}


def reference(steps, eta, batched=False):
    """The authors' algorithm in float64 over per-step gradient lists;
    returns every step's directions and weights."""
    num_tasks = steps[0][0].shape[0]
    sums = None
    log_weights, baseline, out = np.zeros(num_tasks), None, []
    for gradients in steps:
        reduced = [g.sum(axis=1) if batched else g for g in gradients]
        if sums is None:
            sums = [np.zeros_like(g) for g in reduced]
        sums = [s + g**2 for s, g in zip(sums, reduced, strict=True)]
        risks = sum(
            (g**2 / np.sqrt(s + 1e-7)).reshape(num_tasks, -1).sum(axis=1) for g, s in zip(reduced, sums, strict=True)
        )
        if baseline is None:
            baseline = risks
        else:
            log_weights = log_weights + eta * np.where(baseline > 0, risks / np.where(baseline > 0, baseline, 1), 0)
        weights = num_tasks * np.exp(log_weights) / np.exp(log_weights).sum()
        out.append(([np.tensordot(weights, g, axes=1) for g in gradients], weights))
    return out


def built(num_tasks, shapes, **options):
    weighting = ExcessMTL(**options)
    weighting.set_gradient_shapes(shapes)
    weighting.build(num_tasks)
    return weighting


# ------------------------------------------------------------- interface


def test_config_round_trip():
    asserts.assert_config_round_trip(ExcessMTL, OPTIONS)
    default = ExcessMTL()
    assert default.requires_gram and default.gradient_space == "parameters"
    assert default.head_update == "scaled" and default.robust_step_size == 1e-2


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(ExcessMTL)
    for bad in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError, match="robust_step_size"):
            ExcessMTL(robust_step_size=bad)
    with pytest.raises(ValueError, match="per-example shape"):
        built(2, [(None, None)], mode="representation")


def test_head_weights():
    asserts.assert_head_weights(ExcessMTL)


def test_state_shapes_and_build_config():
    weighting = built(3, [(6, 5), (5,)])
    assert [tuple(v.shape) for v in weighting.squared_sums] == [(3, 6, 5), (3, 5)]
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(weighting))
    assert [tuple(v.shape) for v in restored.variables] == [tuple(v.shape) for v in weighting.variables]
    in_z = built(3, [(None, 7)], mode="representation")
    assert [tuple(v.shape) for v in in_z.squared_sums] == [(3, 7)]
    with pytest.raises(RuntimeError, match="set_gradient_shapes"):
        unbuilt = ExcessMTL()
        unbuilt.build(3)
        unbuilt.aggregate([keras.ops.ones((3, 4))], keras.ops.ones(3), keras.ops.eye(3))


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("mode", ["parameters", "representation"])
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_is_the_algorithm_over_steps(num_tasks, mode):
    """Five steps (the first records the baseline, weights 1): directions
    and weights as the reference's, to float32 rounding."""
    rng = np.random.default_rng(num_tasks)
    if mode == "parameters":
        shapes = [(3, 2), (4,)]
        steps = [[rng.standard_normal((num_tasks,) + s) * (1 + k) for s in shapes] for k in range(5)]
    else:
        shapes = [(None, 4)]
        steps = [[rng.standard_normal((num_tasks, 6, 4))] for _ in range(5)]
    weighting = built(num_tasks, shapes, mode=mode, robust_step_size=0.5)
    for k, ((want, weights_want), gradients) in enumerate(
        zip(reference(steps, 0.5, batched=mode == "representation"), steps, strict=True)
    ):
        directions, weights = aggregate(weighting, gradients)
        if k == 0:
            np.testing.assert_array_equal(weights, np.ones(num_tasks))
        np.testing.assert_allclose(weights, weights_want, rtol=1e-5)
        for got, expected in zip(directions, want, strict=True):
            error = np.abs(got - expected).max() / np.abs(expected).max()
            measure(f"excess_mtl_vs_algorithm_{mode}", error)
            assert error <= 1e-5, (k, error)


def test_loss_scale_is_divided_out():
    rng = np.random.default_rng(5)
    plain, scaled = built(3, [(4,)]), built(3, [(4,)])
    for _ in range(3):
        g = rng.standard_normal((3, 4))
        gram = gram_of_gradients([g])
        (d_plain,), w_plain = aggregate(plain, [g], gram=gram)
        (d_scaled,), w_scaled = aggregate(scaled, [g * 2.0**12], gram=gram)
        np.testing.assert_allclose(w_scaled, w_plain, rtol=1e-6)
        np.testing.assert_allclose(d_scaled, 2.0**12 * d_plain, rtol=1e-5, atol=1e-6 * np.abs(d_scaled).max())


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's ExcessMTLWeighting on the same flat Jacobians, four steps.
    It differs from the authors' code (and ours) on purpose: weights start
    at 1/T and the first step already applies eta times the raw risk
    E(first). So its log-weights are ours + eta E(first) (up to a constant
    and its 1e-7 in the divisor): ours = T softmax(log theirs - eta E(first))."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    rng = np.random.default_rng([seed, num_tasks])
    theirs = aggregation.ExcessMTLWeighting(robust_step_size=0.5)
    weighting = built(num_tasks, [(20,)], robust_step_size=0.5)
    first = None
    for _ in range(4):
        g = rng.standard_normal((num_tasks, 20)) * rng.uniform(0.5, 2.0, (num_tasks, 1))
        g = g.astype(np.float32).astype(np.float64)
        expected = theirs(torch.from_numpy(g)).numpy()
        _, weights = aggregate(weighting, [g])
        if first is None:
            first = (g**2 / np.sqrt(g**2 + 1e-7)).sum(axis=1)
        logits = np.log(expected) - 0.5 * first
        mapped = num_tasks * np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        error = np.abs(weights - mapped).max() / mapped.max()
        measure("excess_mtl_vs_torchjd_mapped", error)
        assert error <= 1e-5, error


# ------------------------------------------------------------ through fit


def test_fit_steps_are_the_reference():
    """Three `train_on_batch` steps of the tiny model (parameters mode,
    eta = 0.5): the trunk follows sum_t w_t g_t, the heads w_t times their
    gradients (the authors' loss weighting), the logged weights are w."""
    x, y = tiny.data()
    model = tiny.model(ExcessMTL(robust_step_size=0.5))
    ref = tiny.Reference(tiny.weights_of(model), x, y)
    history = []
    for step in range(3):
        per_task, _ = ref.task_gradients()
        trunk = [np.stack([grads[i] for _, _, grads in per_task]) for i in range(2)]
        history.append(trunk)
        (directions, weights) = reference(history, 0.5)[-1]
        heads = [[w * h for h in head] for w, (_, head, _) in zip(weights, per_task, strict=True)]
        ref.apply(directions, heads)
        model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
        logs = model.train_on_batch(x, y, return_dict=True)
        got = tiny.weights_of(model)
        for name, values in ref.w.items():
            for a, b in zip(got[name], values, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} step {step}")
        np.testing.assert_allclose([logs[f"{t}_alpha"] for t in tiny.TASKS], weights, rtol=1e-5)
