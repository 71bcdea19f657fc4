"""Mixed precision and XLA: the Gram matrix is float32, loss scaling goes
through the optimizer, and the step compiles with jit_compile=True."""

import keras
import numpy as np
import pytest

import keras_mgda as km


@pytest.fixture
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


def _model(normalization="l2"):
    keras.utils.set_random_seed(0)
    x = keras.Input((12,))
    h = keras.layers.Dense(32, activation="relu")(x)
    z = keras.layers.Dense(16, activation="relu", name="shared")(h)
    a = keras.layers.Dense(1, name="a", dtype="float32")(z)
    b = keras.layers.Dense(5, name="b", dtype="float32")(z)
    return km.MGDAModel(x, {"a": a, "b": b}, normalization=normalization)


def _data(n=256):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 12)).astype("float32")
    return x, {
        "a": (x[:, :1] * 3).astype("float32"),
        "b": np.argmax(x[:, 1:6], axis=1).astype("int32"),
    }


def _compile(model, **kwargs):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss={"a": "mse", "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        **kwargs,
    )
    return model


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_trains_with_float32_weights(policy):
    model = _compile(_model())
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.encoder.outputs[0].dtype == policy.split("_")[1]
    x, y = _data()
    logs = model.fit(x, y, epochs=4, batch_size=64, verbose=0).history
    alphas = np.array([logs["a_alpha"], logs["b_alpha"]])
    assert np.all(np.isfinite(alphas)) and np.all(alphas >= 0)
    np.testing.assert_allclose(alphas.sum(0), 1.0, atol=1e-3)
    assert logs["loss"][-1] < logs["loss"][0]
    assert logs["skipped_steps"] == [0.0] * 4


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_float16_gradients_beyond_65504_do_not_overflow_the_gram(policy):
    """Targets of 1e3 give squared gradient norms far above float16's
    maximum; the Gram matrix is formed in float32 and alpha stays finite."""
    model = _compile(_model(normalization="none"))
    x, y = _data(512)
    y = {"a": y["a"] * 1e3, "b": y["b"]}
    # The loss scale optimizer may skip the first steps (scaled float16
    # gradients overflow) while it lowers its scale; then alpha is finite.
    logs = model.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    alphas = np.array([logs["a_alpha"][-1], logs["b_alpha"][-1]])
    assert np.all(np.isfinite(alphas))
    assert alphas.sum() == pytest.approx(1.0, abs=1e-3)
    assert logs["skipped_steps"][-1] == 0.0
    # The task's loss (and so its squared gradient norms) is beyond float16.
    assert logs["a_loss"][0] > 65504


def test_mixed_precision_alpha_close_to_float32():
    x, y = _data(64)
    reference = _compile(_model()).train_on_batch(x, y, return_dict=True)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = _compile(_model()).train_on_batch(x, y, return_dict=True)
    finally:
        keras.config.set_dtype_policy("float32")
    assert mixed["a_alpha"] == pytest.approx(reference["a_alpha"], abs=0.05)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="XLA compile of the step: TF and JAX")
def test_jit_compile_step_matches_the_uncompiled_one():
    x, y = _data(64)
    plain = _compile(_model(), jit_compile=False)
    compiled = _compile(_model(), jit_compile=True)
    compiled.set_weights(plain.get_weights())
    logs_plain = plain.train_on_batch(x, y, return_dict=True)
    logs_compiled = compiled.train_on_batch(x, y, return_dict=True)
    assert logs_compiled["a_alpha"] == pytest.approx(logs_plain["a_alpha"], abs=1e-5)
    for w1, w2 in zip(plain.get_weights(), compiled.get_weights(), strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="XLA compile of the step: TF and JAX")
def test_jit_compiled_step_raises_on_nan_and_keeps_weights():
    x, y = _data(64)
    model = _compile(_model(), jit_compile=True)
    model.train_on_batch(x, y)
    before = model.get_weights()
    y = {"a": y["a"].copy(), "b": y["b"]}
    y["a"][0] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or Inf.* a$"):
        model.train_on_batch(x, y)
    for w0, w1 in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(w0, w1)
