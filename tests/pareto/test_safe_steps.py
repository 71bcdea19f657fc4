"""Safe steps and the checked start: a direction is taken only where it
lowers the chosen combination of the losses, and a start far from the
Pareto set is flagged with its stationarity figure."""

import warnings

import keras
import numpy as np
import pytest

import keras_mgda as km
from keras_mgda.backend import numpy_ops

from ._problems import Quadratic
from ._problems import Saddle


@pytest.fixture(scope="module")
def saddle():
    problem = Saddle()
    return problem, problem.model()


def _theta(weights):
    return weights[0].ravel().astype(np.float64)


def test_negative_curvature_raises_the_damping_and_steps_downhill(saddle):
    problem, model = saddle
    step_size = 0.05
    # What the check guards against: the undamped direction and the one at
    # the default damping 0.1 raise f_0, the chosen combination.
    rhs = problem.gradients(np.zeros(2))[0]
    for damping in (0.0, 0.1, 1.0):
        v = np.linalg.solve(problem.hessian + damping * np.eye(2), rhs)
        assert rhs @ v < 0
        assert problem.losses(-step_size * v / np.linalg.norm(v))[0] > 0.0
    front = km.pareto.explore(model, problem.x, problem.y, directions=[[1.0, 0.0]], steps=3,
                              step_size=step_size, minres_iters=4, verbose=0)
    # 0.1 and 1 give uphill directions; 10 is the first damping x10 above 2.
    assert front.damping[1] == pytest.approx(10.0)
    v = np.linalg.solve(problem.hessian + 10.0 * np.eye(2), rhs)
    np.testing.assert_allclose(_theta(front.weights[1]), -step_size * v / np.linalg.norm(v), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(front.descent[1], rhs @ v / np.linalg.norm(rhs) / np.linalg.norm(v), rtol=1e-4)
    assert np.all(np.diff(front.losses[:, 0]) < 0)  # every step lowers f_0
    assert np.all(front.damping[1:] > 2.0)  # H + damping I stays positive definite
    assert np.all(front.minres_residual[1:] < 1e-4)  # 2 x 2: MINRES is exact in two iterations
    assert np.isnan(front.damping[0]) and front.stopped == {}
    np.testing.assert_array_equal(model.get_weights()[0], np.zeros((1, 2), np.float32))


def test_a_direction_that_cannot_be_made_downhill_stops_with_a_warning(saddle):
    problem, model = saddle
    with pytest.warns(RuntimeWarning, match=r"stopped before step 1: no damping up to max_damping=1 ") as caught:
        front = km.pareto.explore(model, problem.x, problem.y, directions=[[1.0, 0.0], [0.0, 1.0]], steps=2,
                                  max_damping=1.0, minres_iters=4, verbose=0)
    # Symmetric: beta = e_1 needs the same damping as e_0.
    stopped = [str(w.message).split(" (")[0] for w in caught if w.category is RuntimeWarning]
    assert stopped == ["direction 0", "direction 1"]
    assert sorted(front.stopped) == [0, 1]
    assert len(front) == 1  # the start only
    np.testing.assert_array_equal(model.get_weights()[0], np.zeros((1, 2), np.float32))


def test_points_on_a_convex_front_keep_the_damping_asked_for():
    problem = Quadratic(num_tasks=2, seed=7)
    model = problem.model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the start is on the front: no warning
        front = km.pareto.explore(model, problem.x, problem.y, steps=3, damping=0.0, correction_steps=10,
                                  correction_step_size=0.5, verbose=0)
    np.testing.assert_array_equal(front.damping[1:], 0.0)
    assert np.all(front.descent[1:] > 0)
    assert front.stationarity[0] < 1e-3
    assert np.all(front.stationarity < 1e-2)


def _stationarity(gradients):
    """|sum_t alpha_t g_t| / max_t |g_t| from explicit gradients (NumPy)."""
    alpha = km.solvers.min_norm(gradients @ gradients.T, ops=numpy_ops)
    return np.linalg.norm(alpha @ gradients) / np.max(np.linalg.norm(gradients, axis=1))


def test_a_start_off_the_front_is_flagged_with_its_stationarity():
    problem = Quadratic(num_tasks=2, seed=8)
    model = problem.model()
    theta = problem.pareto_point([0.5, 0.5]) + np.array([0.6, -0.4, 0.3])
    model.get_layer("theta").kernel.assign(theta[None].astype(np.float32))
    expected = _stationarity(problem.gradients(theta))
    assert expected > km.pareto.START_STATIONARITY_WARNING
    with pytest.warns(RuntimeWarning, match=rf"not near Pareto-stationary: .* = {expected:.3g} > .*correction_steps"):
        front = km.pareto.explore(model, problem.x, problem.y, steps=1, verbose=0)
    np.testing.assert_allclose(front.stationarity[0], expected, rtol=1e-4)
    # The same measure, without exploring.
    np.testing.assert_allclose(km.pareto.stationarity_of(model, problem.x, problem.y), expected, rtol=1e-4)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("theta").kernel),
                                  theta[None].astype(np.float32))


def test_progress_follows_keras_verbose_auto(capsys):
    problem = Quadratic(num_tasks=2, seed=3)
    model = problem.model()
    km.pareto.explore(model, problem.x, problem.y, steps=2, verbose=0)
    assert capsys.readouterr().out == ""
    # Not a terminal (pytest captures stdout): one plain line per step.
    km.pareto.explore(model, problem.x, problem.y, steps=2, verbose="auto")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("explore ")]
    assert len(lines) == 4 and "t0_loss" in lines[0] and "damping" in lines[0]
    assert "\r" not in out and "\b" not in out
    km.pareto.explore(model, problem.x, problem.y, steps=2, verbose=1)  # Keras's Progbar
    assert "4/4" in capsys.readouterr().out
