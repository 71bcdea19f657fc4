"""One SGD step of MultiTaskModel must change every weight exactly as an
independent reference computes it: per-task gradients by hand (numpy
backprop), alpha from an exact QP, the update applied by hand."""

import keras
import numpy as np
import pytest
from qp_reference import exact_min_norm

import keras_mgda as km

LEARNING_RATE = 0.1
NORMALIZATIONS = ["l2", "loss", "loss+", "none"]


def _build(weighting, seed=0, loss_weights=None):
    rng = np.random.default_rng(seed)
    x = keras.Input((6,), name="x")
    z = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
    ha = keras.layers.Dense(4, activation="tanh", name="a_hidden")(z)
    a = keras.layers.Dense(1, name="a")(ha)
    b = keras.layers.Dense(3, name="b")(z)
    c = keras.layers.Dense(1, name="c")(z)
    model = km.MultiTaskModel(x, {"a": a, "b": b, "c": c}, weighting=weighting)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(
                [rng.normal(scale=0.7, size=w.shape) for w in layer.weights]
            )
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=_losses("abc"),
        loss_weights=loss_weights,
    )
    return model


def _losses(outputs):
    """The compiled loss of each of the outputs named "a", "b", "c"."""
    losses = {
        "a": "mse",
        "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "c": keras.losses.BinaryCrossentropy(from_logits=True),
    }
    return {name: losses[name] for name in outputs}


def _data(seed=1, batch=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 6)).astype("float32")
    y = {
        "a": rng.normal(size=(batch, 1)).astype("float32"),
        "b": rng.integers(0, 3, size=(batch,)).astype("int32"),
        "c": rng.integers(0, 2, size=(batch, 1)).astype("float32"),
    }
    return x, y


def _weights(model):
    return {
        f"{layer.name}/{i}": np.asarray(w, dtype=np.float64)
        for layer in model.layers
        for i, w in enumerate(layer.get_weights())
    }


def _reference_losses_and_grads(p, x, y, sample_weight):
    """Numpy forward and backward of the test model, in float64.

    Returns per-task losses, dL/dz (T, B, 5), and per-task gradients of every
    parameter (dict name -> (T, *shape))."""
    x = x.astype(np.float64)
    batch = x.shape[0]
    sw = np.ones(batch) if sample_weight is None else sample_weight.astype(np.float64)
    pre = x @ p["trunk/0"] + p["trunk/1"]
    z = np.tanh(pre)

    # a: mse through a tanh hidden layer.
    ha_pre = z @ p["a_hidden/0"] + p["a_hidden/1"]
    ha = np.tanh(ha_pre)
    ya = ha @ p["a/0"] + p["a/1"]
    err = ya - y["a"]
    loss_a = np.sum(sw * np.mean(err**2, axis=-1)) / batch
    d_ya = 2 * err * sw[:, None] / batch
    d_ha = d_ya @ p["a/0"].T
    d_ha_pre = d_ha * (1 - ha**2)
    grads_a = {
        "a/0": ha.T @ d_ya,
        "a/1": d_ya.sum(0),
        "a_hidden/0": z.T @ d_ha_pre,
        "a_hidden/1": d_ha_pre.sum(0),
    }
    dz_a = d_ha_pre @ p["a_hidden/0"].T

    # b: softmax cross-entropy on logits.
    logits = z @ p["b/0"] + p["b/1"]
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    onehot = np.eye(3)[y["b"]]
    loss_b = np.sum(sw * -np.log(np.sum(probs * onehot, -1))) / batch
    d_logits = (probs - onehot) * sw[:, None] / batch
    grads_b = {"b/0": z.T @ d_logits, "b/1": d_logits.sum(0)}
    dz_b = d_logits @ p["b/0"].T

    # c: binary cross-entropy on logits.
    lc = z @ p["c/0"] + p["c/1"]
    tc = y["c"]
    per = np.maximum(lc, 0) - lc * tc + np.log1p(np.exp(-np.abs(lc)))
    loss_c = np.sum(sw * per.mean(-1)) / batch
    d_lc = (1 / (1 + np.exp(-lc)) - tc) * sw[:, None] / batch
    grads_c = {"c/0": z.T @ d_lc, "c/1": d_lc.sum(0)}
    dz_c = d_lc @ p["c/0"].T

    dz = np.stack([dz_a, dz_b, dz_c])
    losses = np.array([loss_a, loss_b, loss_c])
    head_grads = [grads_a, grads_b, grads_c]
    d_pre = dz * (1 - z**2)[None]
    trunk = {
        "trunk/0": np.einsum("bi,tbj->tij", x, d_pre),
        "trunk/1": d_pre.sum(1),
    }
    return losses, dz, head_grads, trunk


def _reference_step(p, x, y, weighting, loss_weights, sample_weight=None):
    losses, dz, head_grads, trunk = _reference_losses_and_grads(p, x, y, sample_weight)
    lw = np.array([loss_weights[k] for k in "abc"])
    losses = losses * lw
    dz = dz * lw[:, None, None]
    trunk = {k: v * lw.reshape((-1,) + (1,) * (v.ndim - 1)) for k, v in trunk.items()}
    head_grads = [{k: g * w for k, g in hg.items()} for hg, w in zip(head_grads, lw)]

    if weighting.mode == "representation":
        flat = dz.reshape(3, -1)
    else:
        flat = np.concatenate([trunk["trunk/0"].reshape(3, -1), trunk["trunk/1"]], axis=1)
    gram = flat @ flat.T
    norm = np.sqrt(np.diag(gram))
    divisors = {
        "l2": norm,
        "loss": np.abs(losses),
        "loss+": np.abs(losses) * norm,
        "none": np.ones(3),
    }[weighting.normalization]
    divisors = np.maximum(divisors, weighting.epsilon)
    alpha = exact_min_norm(gram / np.outer(divisors, divisors))
    head_coef = alpha if weighting.head_update == "scaled" else np.ones(3)

    new = dict(p)
    for name, g in trunk.items():
        new[name] = p[name] - LEARNING_RATE * np.tensordot(alpha, g, axes=1)
    for t, grads in enumerate(head_grads):
        for name, g in grads.items():
            new[name] = p[name] - LEARNING_RATE * head_coef[t] * g
    return new, alpha, losses


def _assert_step_matches(model, weighting, loss_weights, sample_weight=None):
    x, y = _data()
    before = _weights(model)
    expected, alpha, losses = _reference_step(before, x, y, weighting, loss_weights, sample_weight)
    logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
    after = _weights(model)
    got_alpha = np.array([logs[f"{k}_alpha"] for k in "abc"])
    np.testing.assert_allclose(got_alpha, alpha, atol=1e-5)
    for k, t in zip("abc", range(3)):
        np.testing.assert_allclose(logs[f"{k}_loss"], losses[t] / loss_weights[k], rtol=1e-5)
    for name in before:
        delta_ref = expected[name] - before[name]
        delta = after[name] - before[name]
        scale = max(np.linalg.norm(delta_ref), 1e-12)
        rel = np.linalg.norm(delta - delta_ref) / scale
        assert rel <= 1e-4, f"{name}: relative error {rel:.2e} of the update"


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("head_update", ["scaled", "full"])
@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_one_sgd_step_matches_reference(float64, normalization, head_update, mode):
    weighting = km.weighting.MGDA(normalization=normalization, mode=mode, head_update=head_update)
    loss_weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    model = _build(weighting)
    _assert_step_matches(model, weighting, loss_weights)


def test_float32_step_matches_reference():
    weighting = km.weighting.MGDA()
    model = _build(weighting)
    _assert_step_matches(model, weighting, {"a": 1.0, "b": 1.0, "c": 1.0})


def test_step_respects_loss_weights_and_sample_weights(float64):
    weighting = km.weighting.MGDA(normalization="loss+")
    loss_weights = {"a": 2.0, "b": 0.5, "c": 1.5}
    model = _build(weighting, loss_weights=loss_weights)
    sample_weight = np.linspace(0.0, 2.0, 16).astype("float32")
    _assert_step_matches(model, weighting, loss_weights, sample_weight=sample_weight)


def test_uniform_is_the_mean_of_task_losses():
    model = _build(km.weighting.Uniform())
    x, y = _data()
    before = _weights(model)
    losses, dz, head_grads, trunk = _reference_losses_and_grads(before, x, y, None)
    logs = model.train_on_batch(x, y, return_dict=True)
    after = _weights(model)
    for k in "abc":
        assert logs[f"{k}_alpha"] == pytest.approx(1 / 3)
    expected = before["trunk/0"] - LEARNING_RATE * trunk["trunk/0"].mean(0)
    np.testing.assert_allclose(after["trunk/0"], expected, rtol=1e-5, atol=1e-7)
    expected = before["b/0"] - LEARNING_RATE * head_grads[1]["b/0"] / 3
    np.testing.assert_allclose(after["b/0"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head_update", ["scaled", "full"])
@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_one_backward_heads_match_per_task_backwards(monkeypatch, head_update, mode):
    """Every backend takes every dL_t/dZ from one backward when the heads
    share nothing (`StepPlan.separable`); it must update every weight as
    the per-task backwards (its path for heads that share layers) do."""
    from keras_mgda.step import StepPlan

    x, y = _data()
    results = []
    for separable in (True, False):
        weighting = km.weighting.MGDA(mode=mode, head_update=head_update)
        model = _build(weighting)
        if not separable:
            monkeypatch.setattr(StepPlan, "separable", property(lambda plan: False))
        logs = model.train_on_batch(x, y, return_dict=True)
        assert model.step_plan.separable is separable
        results.append((logs, _weights(model)))
    (logs_fast, fast), (logs_slow, slow) = results
    for k in "abc":
        np.testing.assert_allclose(logs_fast[f"{k}_alpha"], logs_slow[f"{k}_alpha"], rtol=1e-6)
    assert fast.keys() == slow.keys()
    for name in fast:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_heads_sharing_a_layer_take_the_per_task_path():
    x = keras.Input((6,))
    z = keras.layers.Dense(5, activation="tanh")(x)
    h = keras.layers.Dense(4, activation="tanh", name="ab_hidden")(z)
    outputs = {
        "a": keras.layers.Dense(1, name="a")(h),
        "b": keras.layers.Dense(1, name="b")(h),
        "c": keras.layers.Dense(1, name="c")(z),
    }
    model = km.MGDAModel(x, outputs)
    model.compile(optimizer="sgd", loss={"a": "mse", "b": "mse", "c": "mse"})
    xs = np.ones((4, 6), "float32")
    ys = {k: np.zeros((4, 1), "float32") for k in "abc"}
    logs = model.train_on_batch(xs, ys, return_dict=True)
    assert not model.step_plan.separable
    assert np.isclose(sum(logs[f"{k}_alpha"] for k in "abc"), 1.0, atol=1e-5)
    separate = _build(km.weighting.MGDA())
    separate.train_on_batch(*_data())
    assert separate.step_plan.separable


class _RecordingMGDA(km.weighting.MGDA):
    """MGDA that records the type of the Gram matrix it is given; its `call`
    takes the array namespace, so it inherits MGDA's host solve."""

    seen = []

    def call(self, losses, gram=None, ops=keras.ops):
        type(self).seen.append(type(gram))
        return super().call(losses, gram, ops=ops)


class _StatefulMGDA(_RecordingMGDA):
    """Inherits the host solve, but has state: stays on torch."""

    seen = []

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.calls = self.add_state("calls")


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch step paths")
def test_torch_solves_stateless_weightings_on_the_host(monkeypatch):
    """The torch step solves a `host_solvable` weighting without state on
    NumPy arrays; it must update every weight as the same weighting run on
    torch tensors does. A weighting with state stays on torch tensors."""
    import torch

    x, y = _data()
    results = []
    for on_host in (True, False):
        _RecordingMGDA.seen = []
        if not on_host:
            monkeypatch.setattr(
                km.weighting.Weighting, "solvable_on_host", property(lambda weighting: False)
            )
        model = _build(_RecordingMGDA())
        logs = model.train_on_batch(x, y, return_dict=True)
        assert _RecordingMGDA.seen == [np.ndarray if on_host else torch.Tensor]
        results.append((logs, _weights(model)))
    (logs_host, host), (logs_torch, on_torch) = results
    for k in "abc":
        np.testing.assert_allclose(logs_host[f"{k}_alpha"], logs_torch[f"{k}_alpha"], rtol=1e-6)
    for name in host:
        np.testing.assert_allclose(host[name], on_torch[name], rtol=1e-6, atol=1e-8, err_msg=name)

    monkeypatch.undo()
    _build(_StatefulMGDA()).train_on_batch(x, y)
    assert _StatefulMGDA.seen == [torch.Tensor]

    class Inheriting(km.weighting.MGDA):  # takes no namespace: keras.ops
        def call(self, losses, gram=None):
            Inheriting.seen = type(gram)
            return super().call(losses, gram)

    _build(Inheriting()).train_on_batch(x, y)
    assert Inheriting.seen is torch.Tensor


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX step paths")
def test_jax_finiteness_bound_refuses_every_non_finite_update():
    """The JAX step decides finiteness from a bound on the gradients (their
    parts' largest entries, the heads' times the largest head weight), not
    from the weighted sums: it must refuse every step whose sums would hold
    NaN or Inf, an overflowing product included."""
    from keras_mgda.backend import jax as jax_step

    def finite(encoder, heads, weights):
        parts = [([0, 1], [np.asarray(encoder, "float32"), None])]
        head_parts = [([2 + t], [np.asarray(h, "float32")]) for t, h in enumerate(heads)]
        return bool(jax_step._bounded(parts, head_parts, [np.float32(w) for w in weights]))

    heads = [[1e30, -2.0], [1.0, 3.0]]
    assert finite([1.0, 2.0], heads, [1.0, 0.5])
    assert not finite([1.0, 2.0], heads, [1e10, 0.5])  # 1e40 overflows float32
    assert not finite([1.0, 2.0], heads, [1.0, np.nan])
    assert not finite([1.0, np.inf], heads, [1.0, 0.5])
    assert not finite([1.0, 2.0], [[np.nan, 0.0], [1.0, 3.0]], [0.0, 0.5])  # 0 * NaN
    # The bound overflows: refused, conservatively (no working model gets there).
    assert not finite([3e38, 0.0], [[3e38, 0.0], [1.0, 1.0]], [1.0, 1.0])


class FixedFromGram(km.weighting.Static):
    """Static weights taken through the Gram-matrix step (per-task
    gradients with respect to Z, one encoder backward)."""

    requires_gram = True


def test_gram_step_equals_loss_step_for_the_same_weights(float64):
    """With the same task weights, the Z-space step (per-task backwards
    through the heads, one encoder backward with the combined cotangent)
    must update every weight as the plain weighted-loss step does."""

    def outputs(x):
        h = keras.layers.Dense(5, activation="tanh", name="in")(x)
        z = keras.layers.Dense(5, activation="tanh", name="trunk")(h)
        head_a = keras.layers.Dense(5, activation="tanh", name="a_hidden")(z)
        return {
            "a": keras.layers.Dense(1, name="a")(head_a),
            "b": keras.layers.Dense(3, name="b")(z),
        }

    _assert_gram_step_equals_loss_step(outputs, [0.3, 0.7], seed=3)


def _assert_gram_step_equals_loss_step(outputs, weights, seed):
    """Builds the model `outputs(x)` twice from the same random weights,
    steps once with the task weights `weights` through the Gram-matrix step
    and through the weighted-loss step, and checks that every layer's
    weights (statistics included) agree. Returns both models and the
    weights of each layer before the step."""

    def build(weighting):
        x = keras.Input((6,))
        model = km.MultiTaskModel(x, outputs(x), weighting=weighting)
        rng = np.random.default_rng(seed)
        model.set_weights([rng.normal(scale=0.5, size=w.shape) for w in model.get_weights()])
        model.compile(
            optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=_losses(model.output_names)
        )
        return model

    x, y = _data()
    through_gram = build(FixedFromGram(weights))
    through_loss = build(km.weighting.Static(weights))
    y = {name: y[name] for name in through_gram.output_names}
    before = {layer.name: layer.get_weights() for layer in through_gram.layers}
    through_gram.train_on_batch(x, y)
    through_loss.train_on_batch(x, y)
    for expected_layer, got_layer in zip(through_loss.layers, through_gram.layers):
        expected, got = expected_layer.get_weights(), got_layer.get_weights()
        assert len(got) == len(expected), got_layer.name
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-9, err_msg=got_layer.name)
    return through_gram, through_loss, before


def test_heads_sharing_a_stateful_layer_run_it_once(float64):
    """Two outputs whose heads share a layer with state (BatchNorm): the
    Gram-matrix step must run that layer once per step, as Keras does, and
    update every weight and statistic as the plain weighted-loss step does
    for the same task weights."""

    def outputs(x):
        z = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
        shared = keras.layers.Dense(4, name="shared")(z)
        shared = keras.layers.BatchNormalization(momentum=0.5, name="shared_bn")(shared)
        return {
            "a": keras.layers.Dense(1, name="a")(shared),
            "b": keras.layers.Dense(3, name="b")(shared),
            "c": keras.layers.Dense(1, name="c")(z),
        }

    _, through_loss, before = _assert_gram_step_equals_loss_step(
        outputs, [0.2, 0.5, 0.3], seed=4
    )
    # The statistics moved: the comparison above is not vacuous.
    assert not np.allclose(
        through_loss.get_layer("shared_bn").moving_mean.numpy(),
        before["shared_bn"][2],
    )
