"""`ParetoFront`: saving, restoring, interpolating, non-domination, plots."""

import keras
import numpy as np
import pytest

from keras_mgda.pareto import ParetoFront

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402


def _model():
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1)(keras.layers.Dense(3)(inputs))
    return keras.Model(inputs, outputs)


def _front(model=None, num_tasks=2):
    """A hand-made front: the start, two points towards each task."""
    model = model or _model()
    names = [f"task{t}" for t in range(num_tasks)]
    front = ParetoFront(names, np.eye(num_tasks), model=model)
    base = model.get_weights()
    losses = [np.full(num_tasks, 1.0)]
    indices = [(-1, 0)]
    for k in range(num_tasks):
        for step in (1, 2):
            point = np.full(num_tasks, 1.0 + 0.2 * step)
            point[k] = 1.0 - 0.3 * step
            losses.append(point)
            indices.append((k, step))
    for p, (point, (k, step)) in enumerate(zip(losses, indices)):
        metrics = {f"{n}_accuracy": 1.0 - point[t] / 4 for t, n in enumerate(names)}
        metrics.update({f"{n}_loss": float(point[t]) for t, n in enumerate(names)})
        diagnostics = {} if p == 0 else {"damping": 0.1 * p, "minres_residual": 1e-3 * p, "descent": 0.5}
        front.add(point, metrics, [w + p for w in base], direction=k, step=step, stationarity=0.01 * p, **diagnostics)
    front.cost = {"gradient_passes": 3, "seconds": 1.5}
    front.stopped = {1: "direction 1 stopped before step 3: a reason."}
    return front


def test_save_and_load_round_trip(tmp_path):
    front = _front()
    path = tmp_path / "front.npz"
    front.save(path)
    loaded = ParetoFront.load(path)
    assert loaded.task_names == front.task_names
    np.testing.assert_array_equal(loaded.losses, front.losses)
    np.testing.assert_array_equal(loaded.directions, front.directions)
    np.testing.assert_array_equal(loaded.direction_index, front.direction_index)
    np.testing.assert_array_equal(loaded.step_index, front.step_index)
    assert loaded.metrics == front.metrics
    assert loaded.cost == front.cost
    assert loaded.stopped == front.stopped
    for name in ("damping", "minres_residual", "descent", "stationarity"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(front, name))
    assert np.isnan(loaded.damping[0]) and loaded.damping[2] == pytest.approx(0.2)
    for a, b in zip(loaded.weights, front.weights):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype


def test_restore_and_interpolate(tmp_path):
    model = _model()
    front = _front(model)
    front.restore(3)
    for a, b in zip(model.get_weights(), front.weights[3]):
        np.testing.assert_array_equal(a, b)
    weights = front.interpolate(1, 2, 0.25)
    for a, b, c, m in zip(weights, front.weights[1], front.weights[2], model.get_weights()):
        np.testing.assert_allclose(a, 0.75 * b + 0.25 * c, rtol=1e-6)
        np.testing.assert_array_equal(a, m)  # the model is set to the join
    for t, i in ((0.0, 1), (1.0, 2)):
        for a, b in zip(front.interpolate(1, 2, t), front.weights[i]):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    front.save(tmp_path / "front.npz")
    loaded = ParetoFront.load(tmp_path / "front.npz")
    with pytest.raises(ValueError, match="model"):
        loaded.restore(0)
    other = _model()
    loaded.restore(2, model=other)
    for a, b in zip(other.get_weights(), front.weights[2]):
        np.testing.assert_array_equal(a, b)


def test_pareto_mask():
    front = _front()
    front.add([2.0, 2.0], {}, front.weights[0], direction=0, step=3)  # dominated by the start
    front.add([0.4, 1.4], {}, front.weights[0], direction=0, step=4)  # equal to point 2: both kept
    expected = [True, True, True, True, True, False, True]
    np.testing.assert_array_equal(front.pareto_mask(), expected)


def test_plot_draws_every_point_and_labels_the_axes():
    front = _front()
    ax = front.plot()
    lines = [line for line in ax.get_lines() if line.get_label() != "start"]
    assert len(lines) == 2  # one per direction
    for line, k in zip(lines, range(2)):
        members = np.concatenate([[0], np.flatnonzero(front.direction_index == k)])
        np.testing.assert_array_equal(line.get_xdata(), front.losses[members, 0])
        np.testing.assert_array_equal(line.get_ydata(), front.losses[members, 1])
    (start,) = [line for line in ax.get_lines() if line.get_label() == "start"]
    assert start.get_marker() == "*"
    np.testing.assert_array_equal(start.get_xdata(), [1.0])
    assert ax.get_xlabel() == "task0 loss"
    assert ax.get_ylabel() == "task1 loss"
    plt.close("all")


def test_plot_metric_space_and_pairs_of_three_tasks():
    front = _front(num_tasks=3)
    ax = front.plot(metric="accuracy", tasks=(2, 0))
    assert ax.get_xlabel() == "task2 accuracy"
    assert ax.get_ylabel() == "task0 accuracy"
    points = sum(len(line.get_xdata()) for line in ax.get_lines())
    assert points == 3 * 3 + 1  # each direction's line starts at the start point, plus the star
    axes = front.plot(tasks="all")
    assert [(a.get_xlabel(), a.get_ylabel()) for a in axes] == [
        ("task0 loss", "task1 loss"), ("task0 loss", "task2 loss"), ("task1 loss", "task2 loss")]
    with pytest.raises(KeyError, match="f1"):
        front.plot(metric="f1")
    plt.close("all")
