"""The two extension points for methods that are not a per-task weighting
(`GradientAggregator`, `AfterUpdateHook`) run the same on every backend:
an aggregator's direction is what the step applies, and the hook sees the
batch's losses after the update, computed as Keras computes them."""

import keras
import numpy as np
import pytest

import keras_mgda as km
from keras_mgda.weighting.extensions import AfterUpdateHook
from keras_mgda.weighting.extensions import GradientAggregator

LR = 0.1


class WeightedSum(GradientAggregator):
    """Aggregates sum_t w_t G_t for fixed weights: must equal the Gram step
    of the same fixed weights."""

    def __init__(self, weights=(0.2, 0.3, 0.5), **kwargs):
        super().__init__(**kwargs)
        self.fixed = list(weights)

    def aggregate(self, gradients, losses, gram, ops=keras.ops):
        weights = ops.convert_to_tensor(self.fixed, dtype="float32")
        directions = [ops.tensordot(ops.cast(weights, g.dtype), g, axes=1) for g in gradients]
        return directions, weights


class FixedFromGram(km.weighting.Static):
    requires_gram = True


class Positive(GradientAggregator):
    """An elementwise aggregator (as GradDrop is): the positive part of the
    summed per-task gradients."""

    def aggregate(self, gradients, losses, gram, ops=keras.ops):
        directions = [ops.maximum(ops.sum(g, axis=0), 0.0) for g in gradients]
        return directions, ops.ones_like(losses)


class LossRecorder(AfterUpdateHook, km.weighting.Uniform):
    """Keeps the losses it is shown before and after each update."""

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.before = self.add_state("before", shape=(num_tasks,))
        self.after = self.add_state("after", shape=(num_tasks,))
        self.calls = self.add_state("calls")

    def after_update(self, losses, new_losses):
        self.before.assign(losses)
        self.after.assign(new_losses)
        self.calls.assign_add(1.0)


def _model(weighting, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,))
    z = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
    outputs = {
        "a": keras.layers.Dense(1, name="a")(keras.layers.Dense(4, activation="tanh", name="a_hidden")(z)),
        "b": keras.layers.Dense(3, name="b")(z),
        "c": keras.layers.Dense(1, name="c")(z),
    }
    model = km.MultiTaskModel(x, outputs, weighting=weighting)
    model.compile(
        keras.optimizers.SGD(LR),
        loss={"a": "mse", "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "c": "mse"},
    )
    return model


def _data(n=16):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = {
        "a": rng.normal(size=(n, 1)).astype("float32"),
        "b": rng.integers(0, 3, size=(n,)).astype("int32"),
        "c": rng.normal(size=(n, 1)).astype("float32"),
    }
    return x, y


def _weights(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_aggregated_weighted_sum_equals_the_gram_step(mode):
    x, y = _data()
    results = []
    for weighting in (
        WeightedSum(mode=mode, head_update="scaled"),
        FixedFromGram([0.2, 0.3, 0.5]),
    ):
        model = _model(weighting)
        logs = model.train_on_batch(x, y, return_dict=True)
        results.append((logs, _weights(model)))
    (logs_agg, aggregated), (logs_gram, gram) = results
    assert aggregated.keys() == gram.keys()
    for name in gram:
        np.testing.assert_allclose(aggregated[name], gram[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for task, expected in zip("abc", (0.2, 0.3, 0.5), strict=True):
        assert logs_agg[f"{task}_alpha"] == pytest.approx(expected)


def test_parameters_mode_applies_the_aggregated_direction():
    """In parameters mode the direction is the shared weights' gradient:
    one SGD step moves the trunk by -lr times it."""
    x, y = _data()
    model = _model(Positive(mode="parameters"))
    before = _weights(model)
    model.train_on_batch(x, y)
    moved = before["trunk/kernel"] - _weights(model)["trunk/kernel"]
    assert np.all(moved >= -1e-7)  # the positive part, times the learning rate
    assert np.any(moved > 1e-4)


def test_after_update_hook_sees_the_losses_after_the_step():
    x, y = _data()
    model = _model(LossRecorder())
    model.train_on_batch(x, y)
    weighting = model.weighting
    assert float(keras.ops.convert_to_numpy(weighting.calls)) == 1.0
    after = keras.ops.convert_to_numpy(weighting.after)
    # The same batch through the updated model, each task's compiled loss.
    outputs = model.predict(x, verbose=0)
    expected = [
        np.mean((outputs["a"] - y["a"]) ** 2),
        float(keras.ops.convert_to_numpy(
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y["b"], outputs["b"])
        )),
        np.mean((outputs["c"] - y["c"]) ** 2),
    ]
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    before = keras.ops.convert_to_numpy(weighting.before)
    assert np.all(np.isfinite(before)) and not np.allclose(before, after)


def test_after_update_hook_is_not_called_for_a_skipped_step():
    x, y = _data()
    model = _model(LossRecorder())
    model.on_nonfinite = "skip"
    y_bad = dict(y, a=np.full_like(y["a"], np.nan))
    logs = model.train_on_batch(x, y_bad, return_dict=True)
    assert logs["skipped_steps"] == 1.0
    assert float(keras.ops.convert_to_numpy(model.weighting.calls)) == 0.0
    # The hook's extra forward leaves the metrics as the step left them.
    model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["a_loss"]) and logs["skipped_steps"] == 0.0


def _batchnorm_model(weighting, dropout=0.0, seed=0):
    """A trunk with BatchNorm (and Dropout): training and inference differ."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,))
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(5, name="trunk")(x))
    z = keras.layers.Dropout(dropout, seed=3, name="drop")(keras.layers.Activation("tanh")(h))
    outputs = {"a": keras.layers.Dense(1, name="a")(z), "c": keras.layers.Dense(1, name="c")(z)}
    model = km.MultiTaskModel(x, outputs, weighting=weighting)
    model.compile(keras.optimizers.SGD(LR), loss={"a": "mse", "c": "mse"})
    return model


def _layer_state(model):
    """Every weight, BatchNorm statistic and dropout seed of the layers, by
    layer name and variable name (seed generators are numbered per process)."""
    return {
        f"{layer.name}/{v.name}": keras.ops.convert_to_numpy(v) for layer in model.layers for v in layer.variables
    }


def test_after_update_hook_compares_training_mode_losses():
    """The step's losses are training-mode losses (BatchNorm on the batch's
    statistics), so the losses after the update are too: in inference mode
    the moving statistics, not the update, would make the difference."""
    x, y = _data()
    y = {"a": y["a"], "c": y["c"]}
    model = _batchnorm_model(LossRecorder())
    model.train_on_batch(x, y)
    after = keras.ops.convert_to_numpy(model.weighting.after)
    training = model(x, training=True)
    inference = model(x, training=False)
    expected = [np.mean((keras.ops.convert_to_numpy(training[t]) - y[t]) ** 2) for t in "ac"]
    unexpected = [np.mean((keras.ops.convert_to_numpy(inference[t]) - y[t]) ** 2) for t in "ac"]
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert np.abs(np.asarray(unexpected) - after).max() > 1e-2, (after, unexpected)


def test_after_update_hook_changes_no_batchnorm_statistic_or_dropout_seed():
    """Its extra training-mode forward is undone: over two steps the model
    ends exactly where the same model without the hook does (a second
    BatchNorm update, or a dropout seed drawn twice, would move it)."""
    x, y = _data()
    y = {"a": y["a"], "c": y["c"]}
    states = []
    for weighting in (LossRecorder(), km.weighting.Uniform()):
        model = _batchnorm_model(weighting, dropout=0.5)
        for _ in range(2):
            model.train_on_batch(x, y)
        states.append(_layer_state(model))
    hooked, plain = states
    assert hooked.keys() == plain.keys() and any("moving_mean" in path for path in plain)
    assert any("seed" in path for path in plain), list(plain)
    for path in plain:
        np.testing.assert_array_equal(hooked[path], plain[path], err_msg=path)
