"""MultiTaskModel / MGDAModel behave as Keras models: fit, evaluate, predict,
save and load, and bad input gets a clear error."""

import keras
import numpy as np
import pytest

import keras_mgda as km

TASKS = ("reg", "cls", "bin")


def _untuned_model(weighting=None, **kwargs):
    """Mixed heads, BatchNorm, Dropout, a skip connection inside the trunk,
    dict outputs: a model nobody tuned for."""
    x = keras.Input((10,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="trunk_1")(x)
    h2 = keras.layers.Dense(16, activation="relu", name="trunk_2")(h)
    h = keras.layers.Add(name="skip")([h, h2])
    h = keras.layers.BatchNormalization(name="trunk_bn")(h)
    z = keras.layers.Dense(12, activation="relu", name="shared")(h)
    reg = keras.layers.Dense(1, name="reg")(keras.layers.Dense(8, activation="relu")(z))
    cls = keras.layers.Dense(4, activation="softmax", name="cls")(keras.layers.Dropout(0.3)(z))
    binary = keras.layers.Dense(1, activation="sigmoid", name="bin")(z)
    outputs = {"reg": reg, "cls": cls, "bin": binary}
    if weighting is None and "normalization" in kwargs:
        return km.MGDAModel(x, outputs, **kwargs)
    return km.MultiTaskModel(x, outputs, weighting=weighting, **kwargs)


def _compile(model, **kwargs):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss={
            "reg": "mse",
            "cls": "sparse_categorical_crossentropy",
            "bin": "binary_crossentropy",
        },
        metrics={"cls": ["accuracy"]},
        **kwargs,
    )
    return model


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype("float32")
    y = {
        "reg": (x[:, :1] * 1.5 - x[:, 1:2]).astype("float32"),
        "cls": (np.argmax(x[:, 2:6], axis=1)).astype("int32"),
        "bin": (x[:, 6:7] > 0).astype("float32"),
    }
    return x, y


def test_finds_the_shared_representation():
    model = _untuned_model()
    assert model.encoder.outputs[0].shape[-1] == 12
    assert model.encoder.layers[-1].name == "shared"


def test_untuned_model_trains_logs_alphas_and_round_trips(tmp_path):
    model = _compile(_untuned_model(normalization="l2", head_update="full"))
    x, y = _data()
    history = model.fit(x, y, epochs=3, batch_size=32, validation_split=0.25, verbose=0)
    logs = history.history
    alphas = np.array([logs[f"{t}_alpha"] for t in TASKS])  # (T, epochs)
    assert np.all(alphas >= 0)
    np.testing.assert_allclose(alphas.sum(axis=0), 1.0, atol=1e-5)
    assert logs["loss"][-1] < logs["loss"][0]
    assert all(np.isfinite(v).all() for v in logs.values())
    assert "val_reg_loss" in logs and "val_reg_alpha" not in logs
    assert logs["skipped_steps"] == [0.0, 0.0, 0.0]

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is km.MGDAModel
    assert loaded.weighting.get_config() == model.weighting.get_config()
    assert loaded.on_nonfinite == model.on_nonfinite
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    pred, pred_loaded = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for t in TASKS:
        np.testing.assert_allclose(pred[t], pred_loaded[t], rtol=1e-6)
    assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()

    before = loaded.get_layer("shared").get_weights()[0].copy()
    more = loaded.fit(x, y, epochs=1, batch_size=32, verbose=0).history
    assert np.all(np.isfinite(more["loss"]))
    assert not np.allclose(before, loaded.get_layer("shared").get_weights()[0])
    np.testing.assert_allclose(sum(more[f"{t}_alpha"][0] for t in TASKS), 1.0, atol=1e-5)
    scores = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert "reg_alpha" not in scores and np.isfinite(scores["loss"])


def test_shared_option_round_trips(tmp_path):
    model = _untuned_model(weighting=km.weighting.Uniform(), shared="trunk_bn", on_nonfinite="skip")
    assert model.encoder.layers[-1].name == "trunk_bn"
    _compile(model)
    x, y = _data(64)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.encoder.layers[-1].name == "trunk_bn"
    assert isinstance(loaded.weighting, km.weighting.Uniform)
    assert loaded.on_nonfinite == "skip"


def test_model_without_shared_layers_is_refused():
    x = keras.Input((4,))
    a = keras.layers.Dense(1, name="a")(x)
    b = keras.layers.Dense(1, name="b")(x)
    with pytest.raises(ValueError, match="share no layer"):
        km.MGDAModel(x, [a, b])


def test_skip_around_the_last_trunk_layer_moves_z_earlier():
    x = keras.Input((4,))
    t1 = keras.layers.Dense(4, name="t1")(x)
    t2 = keras.layers.Dense(4, name="t2")(t1)
    a = keras.layers.Dense(1, name="a")(t2)
    b = keras.layers.Dense(1, name="b")(keras.layers.Concatenate()([t1, t2]))
    model = km.MGDAModel(x, [a, b])
    assert model.encoder.layers[-1].name == "t1"


def test_layer_tied_between_trunk_and_head_is_named():
    """A layer called below Z and again in a head cannot be split; the
    error must name it, not blame the choice of Z."""
    x = keras.Input((5,))
    tied = keras.layers.Dense(5, activation="tanh", name="tied")
    z = tied(keras.layers.Dense(5, name="pre")(x))
    a = keras.layers.Dense(1, name="a")(tied(z))
    b = keras.layers.Dense(1, name="b")(z)
    with pytest.raises(ValueError, match=r"\['tied'\] are called both before and after"):
        km.MGDAModel(x, {"a": a, "b": b})


def test_shared_that_is_not_a_cut_is_refused():
    x = keras.Input((4,))
    t1 = keras.layers.Dense(4, name="t1")(x)
    t2 = keras.layers.Dense(4, name="t2")(t1)
    a = keras.layers.Dense(1, name="a")(t2)
    b = keras.layers.Dense(1, name="b")(t1)
    with pytest.raises(ValueError, match="not a shared representation"):
        km.MGDAModel(x, [a, b], shared="t2")
    with pytest.raises(ValueError, match="names no layer"):
        km.MGDAModel(x, [a, b], shared="nope")


def test_output_without_loss_is_not_a_task():
    model = _untuned_model()
    model.compile("sgd", loss={"reg": "mse", "cls": "sparse_categorical_crossentropy"})
    x, y = _data(64)
    logs = model.fit(x, {"reg": y["reg"], "cls": y["cls"]}, epochs=1, verbose=0).history
    assert model.task_names == ["reg", "cls"]
    assert "bin_alpha" not in logs
    np.testing.assert_allclose(logs["reg_alpha"][0] + logs["cls_alpha"][0], 1.0, atol=1e-5)


def test_compile_without_loss_gets_a_clear_error():
    model = _untuned_model()
    model.compile("sgd")
    x, y = _data(32)
    with pytest.raises(ValueError, match="no task|without a loss"):
        model.fit(x, y, epochs=1, verbose=0)


def test_single_task_has_alpha_one():
    x = keras.Input((3,))
    z = keras.layers.Dense(4, name="z")(x)
    out = keras.layers.Dense(1, name="only")(z)
    model = km.MGDAModel(x, {"only": out}, shared="z")
    model.compile("sgd", loss={"only": "mse"})
    rng = np.random.default_rng(0)
    logs = model.fit(rng.normal(size=(32, 3)), {"only": rng.normal(size=(32, 1))}, verbose=0).history
    assert logs["only_alpha"] == [pytest.approx(1.0)]


def _one_output_graph():
    """One output straight on a trunk with BatchNorm: no shared
    representation to find, and no need for one."""
    keras.utils.set_random_seed(3)
    x = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(x)
    h = keras.layers.BatchNormalization()(h)
    return x, {"a": keras.layers.Dense(1, name="a")(h)}


@pytest.mark.parametrize("weighting", ["mgda", "upgrad", "uncertainty", "dwa"])
def test_one_task_model_trains_exactly_as_plain_keras(weighting):
    """A model with one output trains with weight 1 whatever the weighting:
    every weight and BatchNorm statistic after `fit` is bitwise the plain
    Keras model's. (TensorFlow's graph optimiser rounds the two compiled
    graphs' gradients differently in the last bits, with oneDNN on or off:
    measured 3e-8 after 6 steps, so there within 1e-6 relative; eagerly,
    bitwise too.)"""
    ours = km.MultiTaskModel(*_one_output_graph(), weighting=weighting)
    plain = keras.Model(*_one_output_graph())
    def model_weights(model):  # the layers' weights, not the weighting's state
        own = {id(v) for v in ours.weighting.variables}
        return [keras.ops.convert_to_numpy(v) for v in model.weights if id(v) not in own]

    plain.set_weights(model_weights(ours))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = {"a": rng.normal(size=(48, 1)).astype("float32")}
    histories = []
    for model in (ours, plain):
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss={"a": "mse"})
        histories.append(model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history)
    assert histories[0]["a_alpha"] == [1.0, 1.0]
    assert ours.encoder is None and ours.heads is None
    for a, b in zip(model_weights(ours), model_weights(plain), strict=True):
        if keras.backend.backend() in ("tensorflow", "jax"):  # XLA may fuse the two compiled steps differently: ulps
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(a, b)


def test_two_outputs_on_the_input_still_need_a_shared_layer():
    x = keras.Input((4,))
    outputs = {"a": keras.layers.Dense(1, name="a")(x), "b": keras.layers.Dense(1, name="b")(x)}
    with pytest.raises(ValueError, match="share no layer"):
        km.MGDAModel(x, outputs)


def test_mgda_model_rejects_other_weightings():
    x = keras.Input((3,))
    z = keras.layers.Dense(4)(x)
    with pytest.raises(ValueError, match="MultiTaskModel"):
        km.MGDAModel(x, [keras.layers.Dense(1)(z), keras.layers.Dense(1)(z)], weighting=km.weighting.Uniform())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="normalization"):
        km.weighting.MGDA(normalization="l1")
    with pytest.raises(ValueError, match="mode"):
        km.weighting.MGDA(mode="weights")
    with pytest.raises(ValueError, match="head_update"):
        km.weighting.MGDA(head_update="half")
    with pytest.raises(ValueError, match="on_nonfinite"):
        _untuned_model(on_nonfinite="ignore")


# Bad values during training ----------------------------------------------


def _nan_batch():
    x, y = _data(32)
    y = dict(y)
    y["reg"] = y["reg"].copy()
    y["reg"][3] = np.nan
    return x, y


def test_nan_loss_raises_naming_the_task_and_keeps_weights():
    model = _compile(_untuned_model())
    x, y = _data(32)
    model.fit(x, y, epochs=1, verbose=0)
    before = model.get_weights()
    iterations = int(model.optimizer.iterations.numpy())
    x, y = _nan_batch()
    with pytest.raises(FloatingPointError, match=r"NaN or Inf(.|\n)*reg"):
        model.train_on_batch(x, y)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations.numpy()) == iterations


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="torch runs one step per execution"
)
def test_nan_step_inside_steps_per_execution_raises_with_the_weights_before_it():
    """With several steps per execution, the steps after a non-finite one
    change nothing either: the error leaves the weights of the last good
    step."""

    def build():
        x = keras.Input((10,))
        z = keras.layers.Dense(8, activation="tanh", name="shared")(x)
        outputs = {
            "reg": keras.layers.Dense(1, name="reg")(z),
            "bin": keras.layers.Dense(1, activation="sigmoid", name="bin")(z),
        }
        model = km.MGDAModel(x, outputs)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss={"reg": "mse", "bin": "binary_crossentropy"},
            steps_per_execution=4,
        )
        return model

    x, y = _data(32)
    y = {"reg": y["reg"].copy(), "bin": y["bin"]}
    y["reg"][9] = np.nan  # in the second batch of 8
    model, reference = build(), build()
    reference.set_weights(model.get_weights())
    reference.fit(x[:8], {k: v[:8] for k, v in y.items()}, batch_size=8, verbose=0)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf(.|\n)*reg"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # And it trains on afterwards.
    history = model.fit(x[16:], {k: v[16:] for k, v in y.items()}, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only TensorFlow's trainer defers the build into the traced step",
)
@pytest.mark.parametrize("source", ["arrays", "generator"])
def test_fit_builds_the_optimizer_before_tracing(source, monkeypatch):
    """Built inside the trace, every optimizer slot gets a lifted
    initializer (half of a T=40 first fit); the build reads the dataset's
    spec, so no batch is drawn from a one-shot generator."""
    import tensorflow as tf

    inside_trace = []
    build = keras.optimizers.Adam.build

    def recording_build(self, variables):
        inside_trace.append(tf.inside_function())
        return build(self, variables)

    monkeypatch.setattr(keras.optimizers.Adam, "build", recording_build)
    model = _compile(_untuned_model(weighting=km.weighting.MGDA()))
    x, y = _data(64)
    if source == "arrays":
        model.fit(x, y, batch_size=16, verbose=0)
    else:
        batches = ((x[i : i + 16], {k: v[i : i + 16] for k, v in y.items()}) for i in range(0, 64, 16))
        model.fit(batches, verbose=0)
    assert inside_trace == [False]
    assert int(model.optimizer.iterations.numpy()) == 4  # every batch trained


def test_nan_loss_skipped_and_counted():
    model = _compile(_untuned_model(weighting=km.weighting.MGDA(), on_nonfinite="skip"))
    x, y = _data(32)
    model.fit(x, y, epochs=1, verbose=0)
    trainable_before = [v.numpy().copy() for v in model.trainable_variables]
    iterations = int(model.optimizer.iterations.numpy())
    x, y = _nan_batch()
    model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["skipped_steps"] == 1.0
    for a, v in zip(trainable_before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())
    assert int(model.optimizer.iterations.numpy()) == iterations
    x, y = _data(32)
    logs = model.fit(x, y, epochs=1, verbose=0).history
    assert logs["skipped_steps"] == [0.0]
    assert np.isfinite(logs["reg_alpha"][0])


def test_task_with_zero_gradient_does_not_freeze_the_trunk():
    model = _compile(_untuned_model(weighting=km.weighting.MGDA(normalization="none")))
    x, y = _data(32)
    model.fit(x, y, epochs=1, verbose=0)
    before = model.get_layer("shared").get_weights()[0].copy()
    sample_weight = {
        "reg": np.zeros(32, "float32"),
        "cls": np.ones(32, "float32"),
        "bin": np.ones(32, "float32"),
    }
    model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
    logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
    assert logs["reg_alpha"] == 0.0
    assert logs["cls_alpha"] + logs["bin_alpha"] == pytest.approx(1.0)
    assert not np.allclose(before, model.get_layer("shared").get_weights()[0])


# A toy problem with conflicting tasks -------------------------------------


def test_conflicting_tasks_reach_a_pareto_stationary_point():
    """Two tasks pull a shared 2-vector theta towards different targets; the
    Pareto set is the segment between them. MGDA must stop on it, where the
    min-norm point of the gradients is 0."""
    target_a = np.array([[1.0, 0.0]], "float32")
    target_b = np.array([[0.0, 1.0]], "float32")
    x = keras.Input((1,))
    theta = keras.layers.Dense(2, use_bias=False, name="theta")(x)
    a = keras.layers.Identity(name="a")(theta)
    b = keras.layers.Identity(name="b")(theta)
    model = km.MGDAModel(x, {"a": a, "b": b}, normalization="none", shared="theta")
    model.get_layer("theta").set_weights([np.array([[3.0, -2.0]], "float32")])
    model.compile(keras.optimizers.SGD(0.1), loss={"a": "mse", "b": "mse"})
    ones = np.ones((8, 1), "float32")
    model.fit(ones, {"a": np.repeat(target_a, 8, 0), "b": np.repeat(target_b, 8, 0)},
              epochs=150, batch_size=8, verbose=0)
    final = model.get_layer("theta").get_weights()[0][0]
    # On the segment {t * a + (1 - t) * b, 0 <= t <= 1}.
    assert final.sum() == pytest.approx(1.0, abs=1e-3)
    assert np.all(final >= -1e-3) and np.all(final <= 1 + 1e-3)
    # Pareto stationary: gradients 2(theta - a)/2 and 2(theta - b)/2 have a
    # convex combination of (near) zero norm.
    ga, gb = final - target_a[0], final - target_b[0]
    gram = np.array([[ga @ ga, ga @ gb], [gb @ ga, gb @ gb]])
    alpha = km.solvers.min_norm(gram.astype("float64"))
    assert float(np.asarray(alpha) @ gram @ np.asarray(alpha)) < 1e-6


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_every_batch_logs_each_task_weight_by_name(on_nonfinite):
    # A compiled JAX step returns the weights as one vector, which the
    # train function splits by name after the step (fewer kernels).
    model = _compile(_untuned_model(normalization="l2", on_nonfinite=on_nonfinite))
    x, y = _data(64)
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[record])
    assert len(seen) == 2
    for logs in seen:
        assert list(logs) == sorted(logs) and not [key for key in logs if key.startswith("_")]
        alphas = [float(logs[f"{t}_alpha"]) for t in TASKS]
        assert min(alphas) >= 0 and sum(alphas) == pytest.approx(1.0, abs=1e-5)
    scores = model.evaluate(x, y, verbose=0, return_dict=True)
    assert not [key for key in scores if key.startswith("_") or key.endswith("_alpha")]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's compiled step")
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_compiled_jax_step_packs_the_task_weights_only_where_it_waits_anyway(on_nonfinite):
    import jax

    from keras_mgda.backend import PACKED_RESULTS

    model = _compile(_untuned_model(normalization="l2", on_nonfinite=on_nonfinite))
    x, y = _data(32)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables, model.non_trainable_variables,
            model.optimizer.variables, model.metrics_variables,
        )
    )
    logs, _ = jax.jit(model.train_step)(state, (x, y))
    # "raise" reads a flag after every step, so splitting there adds no
    # wait; "skip" keeps the step asynchronous and slices inside it.
    assert (PACKED_RESULTS in logs) == (on_nonfinite == "raise")
    assert ("reg_alpha" in logs) == (on_nonfinite == "skip")
