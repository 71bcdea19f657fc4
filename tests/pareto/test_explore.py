"""`explore` on problems whose Pareto set is known, and on small networks."""

import keras
import numpy as np
import pytest

import keras_mgda as km

from ._problems import Quadratic
from ._problems import small_model

# Exact tangents (no damping: these Hessians are positive definite) and
# MGDA corrections strong enough to stay within 1e-3 of the front.
ON_FRONT = dict(steps=5, step_size=0.1, damping=0.0, correction_steps=10, correction_step_size=0.5, verbose=0)


def _thetas(front):
    return [w[0].ravel().astype(np.float64) for w in front.weights]


@pytest.mark.parametrize("num_tasks", [2, 3])
def test_explored_points_lie_on_the_known_front(num_tasks):
    problem = Quadratic(num_tasks=num_tasks, seed=num_tasks)
    model = problem.model()
    start = model.get_weights()
    front = km.pareto.explore(model, problem.x, problem.y, **ON_FRONT)
    assert len(front) == 1 + num_tasks * 5
    distances = [problem.front_distance(theta) for theta in _thetas(front)]
    print(f"T={num_tasks}: largest relative distance to the front {max(distances):.1e}")
    assert max(distances) <= 1e-3
    assert front.pareto_mask().all()  # mutually non-dominated
    expected = np.array([problem.losses(theta) for theta in _thetas(front)])
    np.testing.assert_allclose(front.losses, expected, rtol=1e-4)
    for k in range(num_tasks):  # beta = e_k lowers task k at every step
        path = front.losses[np.concatenate([[0], np.flatnonzero(front.direction_index == k)]), k]
        assert np.all(np.diff(path) < 0)
    for a, b in zip(model.get_weights(), start):  # left at the start
        np.testing.assert_array_equal(a, b)


def test_one_step_follows_the_tangent_of_the_front():
    # Without corrections or damping, one small step stays on the front to
    # second order: ten times smaller steps, a hundred times closer.
    problem = Quadratic(num_tasks=2, seed=5)
    model = problem.model()
    gaps = []
    for step_size in (0.05, 0.005):
        front = km.pareto.explore(model, problem.x, problem.y, directions=[[1.0, 0.0]], steps=1,
                                  step_size=step_size, damping=0.0, verbose=0)
        gaps.append(problem.front_distance(_thetas(front)[1]))
    assert gaps[1] <= gaps[0] / 30


def test_solvers_agree_and_directions_are_rows():
    problem = Quadratic(num_tasks=2, seed=1)
    model = problem.model()
    directions = [[1.0, 1.0], [0.0, 1.0]]
    fronts = [km.pareto.explore(model, problem.x, problem.y, directions=directions, steps=2, verbose=0, solver=s)
              for s in ("keras", "scipy")]
    np.testing.assert_allclose(fronts[0].losses, fronts[1].losses, rtol=1e-4)
    np.testing.assert_array_equal(fronts[0].directions, directions)
    np.testing.assert_array_equal(fronts[0].direction_index, [-1, 0, 0, 1, 1])
    np.testing.assert_array_equal(fronts[0].step_index, [0, 1, 2, 1, 2])
    # The start's Gram matrix: T backward and T forward-mode passes; each
    # direction: J^T beta at the start (one backward pass), then each new
    # point's Gram matrix (the next step's, and the point's stationarity;
    # J^T beta accumulated on the way, no extra pass).
    assert fronts[0].cost["gradient_passes"] == 2 + 2 * (1 + 2 * 2)
    assert fronts[0].cost["jvp_passes"] == 2 + 2 * 2 * 2
    assert fronts[0].cost["hvp_passes"] == sum(fronts[0].cost["minres_iterations"])


@pytest.mark.filterwarnings("ignore:The start is not near Pareto-stationary")  # an untrained network
def test_network_with_batch_norm_dropout_and_three_tasks():
    model, x, y = small_model(num_tasks=3)
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    statistics = [keras.ops.convert_to_numpy(v) for v in (norm.moving_mean, norm.moving_variance)]
    start = model.get_weights()
    front = km.pareto.explore(model, x, y, steps=2, minres_iters=10, batch_size=24, verbose=0)
    assert front.losses.shape == (7, 3)
    assert np.all(np.isfinite(front.losses))
    assert {"task0_mae", "task1_accuracy", "task2_mae"} <= set(front.metrics[0])
    for a, b in zip(model.get_weights(), start):
        np.testing.assert_array_equal(a, b)
    # The moving statistics are not trainable: no point moves them.
    positions = [i for i, w in enumerate(model.weights) if w is norm.moving_mean or w is norm.moving_variance]
    for weights in front.weights:
        for position, expected in zip(positions, statistics):
            np.testing.assert_array_equal(weights[position], expected)
    # Evaluating a restored point reproduces its losses (inference mode).
    front.restore(4)
    scores = model.evaluate(x, y, batch_size=24, verbose=0, return_dict=True)
    np.testing.assert_allclose([scores[f"task{t}_loss"] for t in range(3)], front.losses[4], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:The start is not near Pareto-stationary")  # an untrained network
def test_shared_only_moves_the_encoder():
    model, x, y = small_model(num_tasks=2)
    front = km.pareto.explore(model, x, y, steps=1, minres_iters=5, trainable="shared", verbose=0)
    encoder = {id(v) for v in model.encoder.trainable_variables}
    for k, (a, b) in enumerate(zip(front.weights[0], front.weights[1])):
        moved = not np.array_equal(a, b)
        assert moved == (id(model.weights[k]) in encoder), model.weights[k].path


def test_dataset_gives_the_same_front_as_arrays():
    tf = pytest.importorskip("tensorflow")
    problem = Quadratic(num_tasks=2, seed=2)
    model = problem.model()
    dataset = tf.data.Dataset.from_tensor_slices((problem.x, problem.y)).batch(3)
    from_arrays = km.pareto.explore(model, problem.x, problem.y, steps=2, batch_size=3, verbose=0)
    from_dataset = km.pareto.explore(model, dataset, steps=2, verbose=0)
    np.testing.assert_allclose(from_dataset.losses, from_arrays.losses, rtol=1e-5)


def test_sampling_all_batches_is_the_full_data_walk():
    problem = Quadratic(num_tasks=2, seed=6)
    model = problem.model()
    full = km.pareto.explore(model, problem.x, problem.y, steps=2, batch_size=2, verbose=0)
    every = km.pareto.explore(model, problem.x, problem.y, steps=2, batch_size=2, sample_batches=4, verbose=0)
    np.testing.assert_array_equal(every.losses, full.losses)
    # Every row has the same losses here, so a sample of them walks the
    # same path; but each direction then computes its own start point.
    sampled = km.pareto.explore(model, problem.x, problem.y, steps=2, batch_size=2, sample_batches=1, verbose=0)
    np.testing.assert_allclose(sampled.losses, full.losses, rtol=1e-5)
    # The start's Gram matrix on all the data once (its stationarity), then
    # once more per direction on that direction's sample (T backward and T
    # forward-mode passes, J^T beta accumulated on the way) instead of one
    # backward pass for J^T beta per direction.
    assert full.cost["gradient_passes"] == 2 + 2 * (1 + 2 * 2)
    assert sampled.cost["gradient_passes"] == full.cost["gradient_passes"] + 2 * (2 - 1)
    assert sampled.cost["jvp_passes"] == full.cost["jvp_passes"] + 2 * 2
    assert sampled.cost["examples_per_pass"] == 2 and full.cost["examples_per_pass"] == 8
    # Examples per kind: the start's passes over all 8, a sampled step's over 2.
    assert full.cost["gradient_examples"] == 8 * full.cost["gradient_passes"]
    assert sampled.cost["gradient_examples"] == 8 * 2 + 2 * (2 * 2 + 2 * 2 * 2)
    assert sampled.cost["hvp_examples"] == 2 * sampled.cost["hvp_passes"]
    assert sampled.cost["evaluation_examples"] == 8 * (1 + 2 * 2)


@pytest.mark.filterwarnings("ignore:The start is not near Pareto-stationary")  # an untrained network
def test_each_step_draws_fresh_batches(monkeypatch):
    from keras_mgda import backend as mtl_backend

    model, x, y = small_model(num_tasks=2)
    draws = []
    average = mtl_backend.batch_average

    def recording(primitive, model, variables, batches, shares, *args):
        draws.append(tuple(id(b) for b in batches))
        np.testing.assert_allclose(sum(shares), 1.0, rtol=1e-6)
        return average(primitive, model, variables, batches, shares, *args)

    monkeypatch.setattr(mtl_backend, "batch_average", recording)
    options = dict(steps=3, minres_iters=3, batch_size=8, sample_batches=2, verbose=0)
    front = km.pareto.explore(model, x, y, seed=0, **options)
    # The start's Gram matrix on all 8 batches (T backward, T forward-mode
    # passes), then every average over a draw of 2.
    assert [len(d) for d in draws[:4]] == [8] * 4 and {len(d) for d in draws[4:]} == {2}
    assert len(set(draws[4:])) >= 3  # a draw per step, not one fixed subset
    assert front.cost["examples_per_pass"] == 16 and front.cost["examples"] == len(x)
    again = km.pareto.explore(model, x, y, seed=0, **options)
    np.testing.assert_array_equal(again.losses, front.losses)  # the seed fixes the draws
    other = km.pareto.explore(model, x, y, seed=1, **options)
    assert not np.allclose(other.losses[1:], front.losses[1:])
    # Points are still scored on all the data.
    scores = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(front.losses[0], [scores["task0_loss"], scores["task1_loss"]], rtol=1e-5)
