"""GradDrop (Chen et al., NeurIPS 2020): per element, the sign purity
P = (1 + sum_t G_t / sum_t |G_t|) / 2 against a uniform draw decides which
sign survives; the update is sum_t (l_t + (1 - l_t) M_t) g_t.

Checked: the interface and options; the masks against a NumPy reference
of Algorithm 1 (batch-separated in representation mode, with and without
sign(Z); elementwise in parameters mode); the limits (leak 1 is the sum;
gradients of one sign survive whole); seeded draws; torchjd's GradDrop on
a Jacobian (torch.rand patched to our draws); and one `fit` step on all
backends against the NumPy reference of the tiny model.
"""

import keras
import numpy as np
import pytest

from keras_mgda.weighting.graddrop import GradDrop

from . import _asserts as asserts
from . import _tiny_model as tiny
from ._aggregating import aggregate
from ._aggregating import uniform_draws
from ._calling import BACKEND
from ._calling import measure

OPTIONS = {"mode": "parameters", "head_update": "scaled", "seed": 7, "leak": [0.0, 0.5, 1.0]}
SEED = 3


def reference(gradients, leak, draws, batched, signs=None):
    """Algorithm 1 in float64: the direction per tensor and the kept share
    of each task's squared gradient."""
    directions, kept, total = [], 0.0, 0.0
    for g, u in zip(gradients, draws, strict=True):
        g = np.asarray(g, np.float64)
        signed = g if signs is None else g * signs[None]
        summed = signed.sum(axis=1) if batched else signed
        absolute = np.abs(summed).sum(axis=0)
        purity = np.where(absolute > 0, 0.5 * (1 + summed.sum(axis=0) / np.where(absolute > 0, absolute, 1)), 0.5)
        masks = ((purity > u)[None] & (summed > 0)) | ((purity < u)[None] & (summed < 0))
        leaks = np.reshape(leak, (-1,) + (1,) * (summed.ndim - 1))
        keep = leaks + (1 - leaks) * masks
        if batched:
            keep = keep[:, None]
        directions.append((keep * g).sum(axis=0))
        kept = kept + (keep * g**2).reshape(len(g), -1).sum(axis=1)
        total = total + (g**2).reshape(len(g), -1).sum(axis=1)
    return directions, np.where(total > 0, kept / np.where(total > 0, total, 1), 1.0)


def built(num_tasks, **options):
    weighting = GradDrop(seed=SEED, **options)
    weighting.build(num_tasks)
    return weighting


def batch_gradients(num_tasks, seed, batch=6, features=(4,)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_tasks, batch) + features).astype(np.float32)


# ------------------------------------------------------------- interface


def test_config_round_trip():
    asserts.assert_config_round_trip(GradDrop, OPTIONS)
    asserts.assert_config_round_trip(GradDrop, {"leak": {"a": 0.2, "b": 0.0}})
    asserts.assert_gradient_options(GradDrop, default_head_update="full")
    assert GradDrop().leak == 0.0


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(GradDrop)
    for bad in (-0.1, 1.5, [0.5, 2.0], []):
        with pytest.raises(ValueError, match="leak"):
            GradDrop(leak=bad)


def test_head_weights():
    asserts.assert_head_weights(GradDrop)


def test_is_not_called_as_a_weighting():
    with pytest.raises(TypeError, match="aggregate"):
        GradDrop()(keras.ops.ones((2,)), keras.ops.eye(2))


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_representation_mode_is_algorithm_one(num_tasks):
    """Batch-separated dL_t/dZ: masks from the batch sums, shared by the
    batch, over two steps (two draws)."""
    weighting = built(num_tasks)
    draws = uniform_draws(SEED, [(4,), (4,)])
    for step in range(2):
        g = batch_gradients(num_tasks, step)
        (direction,), weights = aggregate(weighting, [g])
        (expected,), shares = reference([g], np.zeros(num_tasks), [draws[step]], batched=True)
        error = np.abs(direction - expected).max() / np.abs(g).sum(axis=0).max()
        measure("graddrop_vs_algorithm_representation", error)
        assert error <= 1e-6, (step, error)
        np.testing.assert_allclose(weights, shares, rtol=1e-5)


def test_signs_of_the_representation():
    """`aggregate(..., representation=z)` multiplies by sign(Z) before the
    batch sums, as the paper writes; with Z > 0 it changes nothing."""
    g = batch_gradients(3, 5)
    z = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    (draw,) = uniform_draws(SEED, [(4,)])
    direction, weights = built(3).aggregate([keras.ops.convert_to_tensor(g)], keras.ops.ones(3), None,
                                            representation=keras.ops.convert_to_tensor(z))
    (expected,), shares = reference([g], np.zeros(3), [draw], batched=True, signs=np.sign(z))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(direction[0]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weights), shares, rtol=1e-5)
    positive = built(3).aggregate([keras.ops.convert_to_tensor(g)], keras.ops.ones(3), None,
                                  representation=keras.ops.convert_to_tensor(np.abs(z) + 0.1))
    plain = built(3).aggregate([keras.ops.convert_to_tensor(g)], keras.ops.ones(3), None)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(positive[0][0]), keras.ops.convert_to_numpy(plain[0][0]))


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_parameters_mode_is_elementwise(num_tasks):
    """One mask per element of each shared weight's gradient, one draw per
    weight, per-task leaks."""
    rng = np.random.default_rng(num_tasks)
    gradients = [rng.standard_normal((num_tasks, 3, 2)), rng.standard_normal((num_tasks, 5))]
    leak = np.linspace(0.0, 0.6, num_tasks)
    weighting = built(num_tasks, mode="parameters", leak=list(leak))
    directions, weights = aggregate(weighting, gradients)
    expected, shares = reference(gradients, leak, uniform_draws(SEED, [(3, 2), (5,)]), batched=False)
    for got, want in zip(directions, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights, shares, rtol=1e-5)
    assert np.all(weights >= leak - 1e-6) and np.all(weights <= 1 + 1e-6)


def test_limits():
    """Leak 1 keeps every gradient (the sum, weights 1); gradients that
    agree in sign everywhere survive whole; zero gradients give a zero
    update with weights 1."""
    g = batch_gradients(3, 1)
    (direction,), weights = aggregate(built(3, leak=1.0), [g])
    np.testing.assert_allclose(direction, g.sum(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(weights, 1.0, rtol=1e-6)
    same = np.abs(g)
    (direction,), weights = aggregate(built(3), [same])
    np.testing.assert_allclose(direction, same.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(weights, 1.0, rtol=1e-6)
    (direction,), weights = aggregate(built(3), [np.zeros_like(g)])
    np.testing.assert_array_equal(direction, 0.0)
    np.testing.assert_array_equal(weights, 1.0)


def test_each_element_keeps_one_sign():
    """Whatever the draw (XLA draws others on TensorFlow), each element of
    the update is the sum of the positive or of the negative parts."""
    rng = np.random.default_rng(4)
    g = rng.standard_normal((4, 50))
    for xla in (False, True) if BACKEND == "tensorflow" else (False,):
        (direction,), _ = aggregate(built(4, mode="parameters"), [g], xla=xla)
        positive, negative = np.maximum(g, 0).sum(axis=0), np.minimum(g, 0).sum(axis=0)
        close = np.minimum(np.abs(direction - positive), np.abs(direction - negative))
        assert np.all(close <= 1e-5 * np.abs(g).sum(axis=0)), xla


def test_draws_are_seeded_and_change_every_step():
    g = batch_gradients(3, 7, features=(40,))
    first = [aggregate(built(3), [g])[0][0] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    weighting = built(3)
    steps = [aggregate(weighting, [g])[0][0] for _ in range(2)]
    assert not np.array_equal(steps[0], steps[1])


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed, monkeypatch):
    """torchjd's GradDrop on the Jacobian (T x 20) against ours in
    parameters mode (elementwise, one tensor), with torch.rand returning
    our draw and per-task leaks."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = np.random.default_rng([seed, num_tasks]).standard_normal((num_tasks, 20))
    g = g.astype(np.float32).astype(np.float64)
    leak = np.linspace(0.0, 0.5, num_tasks)
    (draw,) = uniform_draws(SEED, [(20,)])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.from_numpy(draw))
    expected = aggregation.GradDrop(leak=torch.from_numpy(leak))(torch.from_numpy(g)).numpy()
    monkeypatch.undo()
    (direction,), _ = aggregate(built(num_tasks, mode="parameters", leak=list(leak)), [g])
    error = np.abs(direction - expected).max() / np.abs(g).sum(axis=0).max()
    measure("graddrop_vs_torchjd", error)
    assert error <= 1e-6


# ------------------------------------------------------------ through fit


def test_fit_step_is_the_reference():
    """Two `train_on_batch` steps of the tiny model (representation mode):
    every weight moves as the NumPy reference of Algorithm 1 says, the
    heads by their own gradients, and the logged weights are the kept
    shares."""
    x, y = tiny.data()
    model = tiny.model(GradDrop(seed=SEED))
    ref = tiny.Reference(tiny.weights_of(model), x, y)
    draws = uniform_draws(SEED, [(5,), (5,)])
    for step in range(2):
        per_task, _ = ref.task_gradients()
        jac_z = np.stack([dz for dz, _, _ in per_task])
        (cotangent,), shares = reference([jac_z], np.zeros(3), [draws[step]], batched=True)
        ref.apply(ref.trunk_gradients(cotangent), [head for _, head, _ in per_task])
        model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
        logs = model.train_on_batch(x, y, return_dict=True)
        got = tiny.weights_of(model)
        for name, values in ref.w.items():
            for a, b in zip(got[name], values, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} step {step}")
        np.testing.assert_allclose([logs[f"{t}_alpha"] for t in tiny.TASKS], shares, rtol=1e-5)
