"""Bad input to `explore`: a clear error saying what to pass instead, and
every variable of the model (weights, metrics, optimizer) bitwise as it
was."""

import keras
import numpy as np
import pytest

import keras_mgda as km

from ._problems import Quadratic


@pytest.fixture(scope="module")
def problem():
    quadratic = Quadratic(num_tasks=2, seed=4)
    model = quadratic.model()
    model.evaluate(quadratic.x, quadratic.y, verbose=0)  # metrics with a state to keep
    return quadratic, model


def _state(model):
    variables = list(model.variables) + list(model.metrics_variables) + list(model.optimizer.variables)
    return [(v, np.array(keras.ops.convert_to_numpy(v), copy=True)) for v in variables]


def _unchanged(state):
    for variable, value in state:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value, err_msg=variable.path)


BAD_OPTIONS = [
    (dict(solver="cg"), ValueError, "solver"),
    (dict(trainable="heads"), ValueError, "trainable"),
    (dict(batch_size=0), ValueError, r"batch_size must be a positive integer .* None for 1024; got 0"),
    (dict(batch_size=2.5), ValueError, "batch_size must be a positive integer"),
    (dict(directions=[[1.0, 0.0, 0.0]]), ValueError, r"\(K, 2\).*got shape \(1, 3\)"),
    (dict(directions=np.ones((2, 2, 2))), ValueError, r"2-D array \(K, 2\).*got shape \(2, 2, 2\)"),
    (dict(directions=[1.0, 0.0]), ValueError, r"For a single direction pass \[beta\]"),
    (dict(directions=[[1.0, np.nan]]), ValueError, "directions must be finite"),
    (dict(directions=[[1.0, 0.0], [0.0, 0.0]]), ValueError, r"Row\(s\) \[1\] of directions are all zeros"),
    (dict(sample_batches=0), ValueError, "sample_batches must be None"),
    (dict(sample_batches=5, batch_size=2), ValueError, r"sample_batches=5 but the data has 4 batches of 2: pass "
     r"sample_batches <= 4, or None"),
    (dict(steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(step_size=float("nan")), ValueError, "step_size must be a positive finite number"),
    (dict(damping=-1.0), ValueError, "damping must be a finite number >= 0"),
    (dict(damping=1.0, max_damping=0.5), ValueError, "max_damping must be finite and at least damping"),
    (dict(min_descent=1.0), ValueError, "min_descent"),
    (dict(verbose=3), ValueError, "verbose must be one of"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_bad_options_raise_and_change_nothing(problem, options, error, message):
    quadratic, model = problem
    state = _state(model)
    with pytest.raises(error, match=message):
        km.pareto.explore(model, quadratic.x, quadratic.y, steps=options.pop("steps", 1), verbose=options.pop(
            "verbose", 0), **options)
    _unchanged(state)


def test_a_dataset_with_a_batch_size_is_refused(problem):
    tf = pytest.importorskip("tensorflow")
    quadratic, model = problem
    dataset = tf.data.Dataset.from_tensor_slices((quadratic.x, quadratic.y)).batch(4)
    with pytest.raises(ValueError, match="a tf.data.Dataset keeps its own batches: pass batch_size=None"):
        km.pareto.explore(model, dataset, batch_size=4, verbose=0)


@pytest.mark.parametrize("where", ["x", "y"])
def test_non_finite_data_raises_floating_point_error_at_the_start(problem, where):
    quadratic, model = problem
    x, y = quadratic.x.copy(), {k: v.copy() for k, v in quadratic.y.items()}
    if where == "x":
        x[1, 0] = np.nan
    else:
        y["t1"][2, 0] = np.inf
    state = _state(model)
    task = "t0" if where == "x" else "t1"  # NaN in x reaches every task, Inf in t1's targets only t1
    with pytest.raises(FloatingPointError, match=rf"loss of task '{task}' is (nan|inf) at the start \(point 0\)"):
        km.pareto.explore(model, x, y, steps=1, verbose=0)
    _unchanged(state)


def test_a_non_finite_weight_is_named(problem):
    quadratic, model = problem
    kernel = model.get_layer("theta").kernel
    good = keras.ops.convert_to_numpy(kernel).copy()
    bad = good.copy()
    bad[0, 1] = np.nan
    kernel.assign(bad)
    try:
        state = _state(model)
        with pytest.raises(ValueError, match=r"variable 'theta/kernel' holds NaN or Inf"):
            km.pareto.explore(model, quadratic.x, quadratic.y, steps=1, verbose=0)
        _unchanged(state)
    finally:
        kernel.assign(good)


def test_losses_that_overflow_along_the_walk_name_the_point(problem):
    quadratic, model = problem
    state = _state(model)
    with pytest.raises(FloatingPointError, match=r"task 't[01]' is inf at point \(direction 0, beta=\[1.0, 0.0\], "
                                                 r"step 1\)"):
        km.pareto.explore(model, quadratic.x, quadratic.y, steps=2, step_size=1e30, verbose=0)
    _unchanged(state)


def test_a_model_with_one_task_is_refused(problem):
    quadratic, _ = problem
    inputs = keras.Input((1,))
    single = km.MultiTaskModel(inputs, keras.layers.Dense(1)(inputs))
    single.compile("sgd", loss="mse")
    with pytest.raises(ValueError, match="two tasks"):
        km.pareto.explore(single, quadratic.x, quadratic.y["t0"][:, :1], verbose=0)
