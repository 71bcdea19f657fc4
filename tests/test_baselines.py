"""The grid-search and single-task baselines."""

import math

import keras
import numpy as np
import pytest

import keras_mgda as km


@pytest.mark.parametrize("num_tasks, steps", [(1, 3), (2, 4), (3, 4), (4, 2)])
def test_simplex_grid_covers_the_simplex(num_tasks, steps):
    grid = km.simplex_grid(num_tasks, steps)
    assert len(grid) == math.comb(steps + num_tasks - 1, num_tasks - 1)
    assert len(set(grid)) == len(grid)
    for point in grid:
        assert len(point) == num_tasks
        assert abs(sum(point) - 1.0) < 1e-12
        assert all(abs(p * steps - round(p * steps)) < 1e-9 for p in point)
    # The single-task vertices come first.
    for index in range(num_tasks):
        assert grid[index][index] == 1.0


def test_simplex_grid_rejects_empty_grids():
    with pytest.raises(ValueError, match="steps >= 1"):
        km.simplex_grid(2, 0)


def _build(weighting):
    keras.utils.set_random_seed(3)
    x = keras.Input((4,))
    z = keras.layers.Dense(8, activation="relu", name="shared")(x)
    a = keras.layers.Dense(1, name="a")(z)
    b = keras.layers.Dense(1, name="b")(z)
    return km.MultiTaskModel(x, {"a": a, "b": b}, weighting=weighting)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    return x, {"a": x[:, :1].copy(), "b": -x[:, 1:2]}


def test_grid_search_trains_one_model_per_weight_vector():
    x, y = _data()
    compile_kwargs = {"optimizer": keras.optimizers.SGD(0.1), "loss": {"a": "mse", "b": "mse"}}
    results = km.grid_search(
        _build, compile_kwargs, x, y, steps=2, validation_data=(x, y),
        epochs=2, batch_size=32, verbose=0,
    )
    assert [r["weights"] for r in results] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    for result in results:
        np.testing.assert_allclose(result["history"]["a_alpha"], result["weights"][0])
        assert len(result["history"]["loss"]) == 2
        assert set(result["evaluation"]) >= {"loss", "a_loss", "b_loss"}
    # All weight on task a: its loss ends lowest there, and task b's is worst.
    a_losses = [r["evaluation"]["a_loss"] for r in results]
    b_losses = [r["evaluation"]["b_loss"] for r in results]
    assert np.argmin(a_losses) == 0 and np.argmax(b_losses) == 0


def test_a_zero_static_weight_leaves_that_head_untouched():
    model = _build(km.weighting.Static({"a": 1.0, "b": 0.0}))
    model.compile(keras.optimizers.SGD(0.1), loss={"a": "mse", "b": "mse"})
    x, y = _data()
    before = {
        name: [w.copy() for w in model.get_layer(name).get_weights()] for name in ("a", "b")
    }
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    for old, new in zip(before["b"], model.get_layer("b").get_weights()):
        np.testing.assert_array_equal(old, new)
    assert any(
        not np.array_equal(old, new)
        for old, new in zip(before["a"], model.get_layer("a").get_weights())
    )


def test_single_task_model_has_the_same_trunk_and_fresh_weights():
    model = _build(None)
    singles = km.single_task_models(model)
    assert sorted(singles) == ["a", "b"]
    single = singles["b"]
    assert single.output_names == ["b"]
    shapes = [w.shape for w in single.get_weights()]
    expected = [w.shape for w in model.get_layer("shared").get_weights()] + [
        w.shape for w in model.get_layer("b").get_weights()
    ]
    assert shapes == expected
    # New layers: training the single-task model leaves the original alone.
    original = [w.copy() for w in model.get_weights()]
    single.compile(keras.optimizers.SGD(0.1), loss={"b": "mse"})
    x, y = _data()
    single.fit(x, {"b": y["b"]}, epochs=1, batch_size=32, verbose=0)
    for old, new in zip(original, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    with pytest.raises(ValueError, match="no output 'c'"):
        km.single_task_model(model, "c")
