"""Bad input never costs the user anything they trained.

A matrix of bad batches, run on every backend: NaN and Inf in the inputs
(also where the forward pass swallows them, so that only a gradient of the
shared weights is non-finite), in the targets and in the sample weights;
labels out of range; a task whose loss is constant; a loss that overflows
float16 under mixed precision. Each case asserts the error (its type and
message) or the skip, and that every variable of the model, the optimizer,
the metrics and the weighting is bitwise what it was before the bad step
(only the step records, `skipped_steps` and the non-finite flag, move).
"""

import keras
import numpy as np
import pytest

import keras_mgda as km

BACKEND = keras.backend.backend()
TASKS = ("reg", "cls", "bin")
N = 64


@keras.saving.register_keras_serializable(package="keras_mgda_tests")
class SwallowNaN(keras.layers.Layer):
    """Maps NaN to 0 in the forward pass (as TensorFlow's ReLU does), so
    the losses and dL/dZ stay finite while the first layer's weight
    gradient, x^T delta with a NaN in x, does not."""

    def call(self, x):
        return keras.ops.where(keras.ops.isnan(x), keras.ops.zeros_like(x), x)


def build(weighting=None, on_nonfinite="raise", swallow=False, **compile_kwargs):
    """The issue's model: Dense-BatchNorm-Dense with a skip connection, Z of
    16 units; a regression, a softmax and a sigmoid head."""
    keras.utils.set_random_seed(0)
    x = keras.Input((10,), name="features")
    h = keras.layers.Dense(32, activation="relu", name="dense_1")(x)
    if swallow:
        h = SwallowNaN(name="swallow")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h2 = keras.layers.Dense(32, activation="relu", name="dense_2")(h)
    h = keras.layers.Add(name="skip")([h, h2])
    z = keras.layers.Dense(16, activation="relu", name="shared")(h)
    outputs = {
        "reg": keras.layers.Dense(1, name="reg")(z),
        "cls": keras.layers.Dense(4, activation="softmax", name="cls")(z),
        "bin": keras.layers.Dense(1, activation="sigmoid", name="bin")(z),
    }
    model = km.MultiTaskModel(
        x, outputs, weighting=weighting or km.weighting.MGDA(), on_nonfinite=on_nonfinite
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss={"reg": "mse", "cls": "sparse_categorical_crossentropy", "bin": "binary_crossentropy"},
        metrics={"cls": ["accuracy"]},
        **compile_kwargs,
    )
    return model


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 10)).astype("float32")
    y = {
        "reg": (x[:, :1] - x[:, 1:2]).astype("float32"),
        "cls": np.argmax(x[:, 2:6], axis=1).astype("int32"),
        "bin": (x[:, 6:7] > 0).astype("float32"),
    }
    return x, y


def _metric_variables(model):
    plan = model.step_plan
    records = set() if plan is None else plan.record_variable_ids()
    return [v for v in model.metrics_variables if id(v) not in records]


def state(model):
    """Every variable of the model, optimizer and weighting as NumPy arrays
    keyed by path, and every metric's variables but the step records.

    `fit` resets the metrics before the step, and so does `train_on_batch`
    since Keras 3.15; resetting them here too makes the state a failed step
    must leave the reset one on every Keras.
    """
    model.reset_metrics()
    return current_state(model)


def current_state(model):
    """The same variables' current values (metrics included)."""
    variables = list(model.variables) + list(model.optimizer.variables) + _metric_variables(model)
    return {f"{v.path}#{id(v)}": np.array(keras.ops.convert_to_numpy(v)) for v in variables}


def assert_unchanged(before, model):
    after = current_state(model)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def trained(**kwargs):
    """A model after two good steps (so that the optimizer, BatchNorm and
    the metrics hold non-trivial state), at the batch size of the bad
    steps: one compiled step serves the whole test on TensorFlow and JAX."""
    model = build(**kwargs)
    x, y = data()
    model.fit(x, y, batch_size=N, epochs=2, verbose=0)
    return model


def with_nan_input(x, y):
    x = x.copy()
    x[5, 3] = np.nan
    return x, y


def with_inf_input(x, y):
    x = x.copy()
    x[5, 3] = np.inf
    return x, y


def with_nan_target(x, y):
    y = dict(y, reg=y["reg"].copy())
    y["reg"][7] = np.nan
    return x, y


def with_inf_target(x, y):
    y = dict(y, reg=y["reg"].copy())
    y["reg"][7] = np.inf
    return x, y


# Case: (bad batch, the task the error names, whether the forward must
# swallow the NaN). "none": the losses and dL/dZ are finite, a shared
# weight's gradient is not.
CASES = {
    "nan_input_swallowed": (with_nan_input, "none", True),
    "nan_target": (with_nan_target, "reg", False),
    "inf_target": (with_inf_target, "reg", False),
}


def _fit_one_batch(model, x, y, **kwargs):
    options = {"batch_size": N, "epochs": 1, "verbose": 0, "shuffle": False}
    return model.fit(x, y, **dict(options, **kwargs))


def _step(model, x, y, **kwargs):
    return model.train_on_batch(x, y, return_dict=True, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_non_finite_batch_raises_naming_the_task_and_changes_nothing(case):
    corrupt, task, swallow = CASES[case]
    model = trained(swallow=swallow)
    before = state(model)
    x, y = corrupt(*data(1))
    with pytest.raises(FloatingPointError, match=rf"NaN or Inf(.|\n)*Task: {task}"):
        _step(model, x, y)
    assert_unchanged(before, model)
    # Inside `fit` too.
    with pytest.raises(FloatingPointError, match=rf"Task: {task}"):
        _fit_one_batch(model, x, y)
    assert_unchanged(before, model)
    # And training goes on from there.
    history = _fit_one_batch(model, *data(2))
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_non_finite_batch_is_skipped_and_changes_nothing(case):
    corrupt, _, swallow = CASES[case]
    model = trained(swallow=swallow, on_nonfinite="skip")
    before = state(model)
    x, y = corrupt(*data(1))
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["skipped_steps"] == 1.0
    assert_unchanged(before, model)


def test_inf_input_that_reaches_the_losses():
    """Inf in an input makes the forward NaN: the step stops before any
    change, and the error blames the input features on every backend
    (torch's binary cross-entropy refuses the NaN prediction with its own
    RuntimeError first: that error is diagnosed alike)."""
    model = trained()
    before = state(model)
    x, y = with_inf_input(*data(1))
    with pytest.raises(FloatingPointError, match=r"input features hold NaN or Inf(.|\n)*Task: none \(the input"):
        _step(model, x, y)
    assert_unchanged(before, model)


def test_label_out_of_range():
    """A class label beyond the softmax's 4 classes: a ValueError naming
    the task and the range on every backend, checked before the loss runs
    (TensorFlow and torch raised their own errors, and Keras's JAX
    cross-entropy one-hot encodes the label to a zero row, a loss of 0
    that trained on silently). Nothing changes."""
    model = trained()
    before = state(model)
    x, y = data(1)
    y = dict(y, cls=y["cls"].copy())
    y["cls"][3] = 7
    with pytest.raises(ValueError, match=r"task 'cls': its target holds class labels outside \[0, 4\)"):
        _step(model, x, y)
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="Task: cls"):
        _fit_one_batch(model, x, y)
    assert_unchanged(before, model)


def test_task_with_constant_loss_gets_no_weight():
    """A task whose loss does not depend on the model this batch (all its
    sample weights 0: zero gradient) is left out of MGDA's problem; the
    step is taken."""
    model = trained()
    x, y = data(1)
    sample_weight = {task: np.ones(N, "float32") for task in TASKS}
    sample_weight["bin"][:] = 0.0
    before = model.get_layer("shared").get_weights()[0].copy()
    model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
    logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
    assert logs["bin_alpha"] == 0.0 and logs["skipped_steps"] == 0.0
    assert logs["reg_alpha"] + logs["cls_alpha"] == pytest.approx(1.0, abs=1e-6)
    assert not np.array_equal(before, model.get_layer("shared").get_weights()[0])


def test_loss_that_overflows_float16_under_mixed_precision():
    """Under mixed_float16 a regression output beyond 65504 is Inf in
    float16: the step raises naming the task, before the LossScaleOptimizer
    or anything else changes."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = trained()
        kernel, bias = model.get_layer("reg").get_weights()
        model.get_layer("reg").set_weights([kernel * 1e6, bias])
        before = state(model)
        with pytest.raises(FloatingPointError, match="Task: reg"):
            _step(model, *data(1))
        assert_unchanged(before, model)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_stateful_weighting_state_survives_a_bad_step():
    """DWA keeps running loss sums, Uncertainty learns log-variances: a bad
    step changes neither (nor anything else)."""
    for weighting in (km.weighting.DWA(), km.weighting.Uncertainty()):
        model = trained(weighting=weighting)
        before = state(model)
        x, y = with_nan_target(*data(1))
        with pytest.raises(FloatingPointError, match="Task: reg"):
            _step(model, x, y)
        assert_unchanged(before, model)


@pytest.mark.skipif(BACKEND == "torch", reason="Keras's torch backend runs one step per execution")
def test_gradient_only_nan_inside_steps_per_execution():
    """With four steps per execution, a batch whose only non-finite value is
    a shared weight's gradient stops the execution there: the steps before
    it are kept, it and the steps after it change nothing."""
    model = build(swallow=True, steps_per_execution=4)
    reference = build(swallow=True, steps_per_execution=4)
    reference.set_weights(model.get_weights())
    x, y = data(1)
    x[16 + 5, 3] = np.nan  # in the second batch of 16
    _fit_one_batch(reference, x[:16], {k: v[:16] for k, v in y.items()}, batch_size=16)
    with pytest.raises(FloatingPointError, match="Task: none"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's XLA path")
def test_gradient_only_nan_under_xla():
    model = trained(swallow=True, jit_compile=True)
    before = state(model)
    x, y = with_nan_input(*data(1))
    with pytest.raises(FloatingPointError, match="Task: none"):
        _step(model, x, y)
    assert_unchanged(before, model)


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_finite_finds_one_bad_entry(fused):
    """The finiteness decision, per gradient or in one fused reduction (the
    JAX step's), flags a single NaN or Inf anywhere and nothing else."""
    from keras_mgda.step import phases

    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    clean = [rng.normal(size=s).astype("float32") for s in shapes]
    as_tensors = lambda arrays: [keras.ops.convert_to_tensor(a) for a in arrays]  # noqa: E731
    assert bool(phases.gradients_finite(as_tensors(clean) + [None], fused=fused))
    assert bool(phases.gradients_finite([None], fused=fused))
    for k, bad in [(0, np.nan), (1, np.inf), (2, -np.inf)]:
        grads = [a.copy() for a in clean]
        grads[k].flat[-1] = bad
        assert not bool(phases.gradients_finite(as_tensors(grads), fused=fused))
    # Mixed dtypes (fused: one reduction per dtype, no cast).
    mixed = as_tensors(clean[:2]) + [keras.ops.convert_to_tensor(clean[2].astype("float16"))]
    assert bool(phases.gradients_finite(mixed, fused=fused))
