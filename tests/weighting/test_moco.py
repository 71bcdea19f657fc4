"""MoCo (Fernando et al., ICLR 2023): tracked per-task gradient estimates
y_t <- y_t - beta_k (y_t - g_t), lambda <- Proj_simplex(lambda - gamma_k
(Y Y^T + rho I) lambda), update T sum_t lambda_t y_t (the authors' code).

torchjd has no MoCo: checked against a NumPy reference of the algorithm
over several steps (decays and rho included), the simplex projection
against its definition, the loss scale divided out, the state's shapes
and errors, and one `fit` step on all backends against the NumPy
reference of the tiny model (the model creates the state from the shared
weights' shapes before the first step).
"""

import keras
import numpy as np
import pytest

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting import moco
from keras_mgda.weighting.moco import MoCo

from . import _asserts as asserts
from . import _tiny_model as tiny
from ._aggregating import aggregate
from ._aggregating import gram_of_gradients
from ._calling import measure

OPTIONS = {"beta": 0.5, "gamma": 0.2, "beta_decay": 0.5, "gamma_decay": 0.5, "rho": 0.1, "head_update": "scaled"}
SHAPES = [(3, 2), (4,)]


def simplex_reference(v):
    """The Euclidean projection onto the simplex by bisection on theta
    (sum max(v - theta, 0) = 1), independent of the sort formula."""
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        theta = 0.5 * (low + high)
        if np.maximum(v - theta, 0).sum() > 1:
            low = theta
        else:
            high = theta
    return np.maximum(v - 0.5 * (low + high), 0)


def reference(steps, beta, gamma, beta_decay=0.0, gamma_decay=0.0, rho=0.0):
    """The algorithm in float64 over a list of per-step gradient lists;
    returns the directions and weights of every step."""
    num_tasks = steps[0][0].shape[0]
    y = [np.zeros_like(g, np.float64) for g in steps[0]]
    lambdas = np.full(num_tasks, 1.0 / num_tasks)
    out = []
    for k, gradients in enumerate(steps):
        beta_k, gamma_k = beta / (k + 1) ** beta_decay, gamma / (k + 1) ** gamma_decay
        y = [a - beta_k * (a - g) for a, g in zip(y, gradients, strict=True)]
        flat = np.concatenate([a.reshape(num_tasks, -1) for a in y], axis=1)
        lambdas = simplex_reference(lambdas - gamma_k * (flat @ flat.T + rho * np.eye(num_tasks)) @ lambdas)
        out.append(([num_tasks * np.tensordot(lambdas, a, axes=1) for a in y], num_tasks * lambdas))
    return out


def built(num_tasks, shapes=SHAPES, **options):
    weighting = MoCo(**options)
    weighting.set_gradient_shapes(shapes)
    weighting.build(num_tasks)
    return weighting


def random_steps(num_tasks, count, seed=0):
    rng = np.random.default_rng([seed, num_tasks])
    return [[rng.standard_normal((num_tasks,) + s) for s in SHAPES] for _ in range(count)]


# ------------------------------------------------------------- interface


def test_config_round_trip():
    asserts.assert_config_round_trip(MoCo, OPTIONS)
    default = MoCo()
    assert default.requires_gram and default.gradient_space == "parameters" and default.head_update == "full"
    options = (default.beta, default.gamma, default.beta_decay, default.gamma_decay, default.rho)
    assert options == (0.99, 0.1, 0.0, 0.0, 0.0)


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="parameters"):
        MoCo(mode="representation")
    with pytest.raises(ValueError, match="full"):
        MoCo(head_update="half")
    for name, bad in (("beta", 0.0), ("beta", 1.5), ("gamma", 0.0), ("beta_decay", -1.0), ("rho", -0.1)):
        with pytest.raises(ValueError, match=name):
            MoCo(**{name: bad})


def test_head_weights():
    asserts.assert_head_weights(MoCo)


def test_state_needs_the_gradient_shapes():
    """Without shapes there is no state to track: a clear error; the build
    config keeps the shapes, so deserialising makes the same variables;
    other shapes after building are refused."""
    unbuilt = MoCo()
    unbuilt.build(3)
    with pytest.raises(RuntimeError, match="set_gradient_shapes"):
        unbuilt.aggregate([keras.ops.ones((3, 4))], keras.ops.ones(3), keras.ops.eye(3))
    weighting = built(3)
    assert [tuple(v.shape) for v in weighting.variables] == [(3, 3, 2), (3, 4), (3,), ()]
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(weighting))
    assert [tuple(v.shape) for v in restored.variables] == [(3, 3, 2), (3, 4), (3,), ()]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored.lambdas), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="shapes"):
        weighting.set_gradient_shapes([(3, 2)])
    with pytest.raises(ValueError, match="unbuilt instance"):
        unbuilt.set_gradient_shapes(SHAPES)
    with pytest.raises(ValueError, match="shapes"):
        aggregate(weighting, [np.ones((3, 5)), np.ones((3, 4))])


# ------------------------------------------------------- defining conditions


def test_simplex_projection():
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(n) * s for n in (1, 2, 3, 10, 40) for s in (0.1, 1.0, 10.0)]
    cases += [np.array([0.2, 0.3, 0.5]), np.array([1.0, 1.0, 1.0]), np.array([-5.0, 0.0, 5.0])]
    for v in cases:
        got = moco.project_onto_simplex(v, ops=numpy_ops)
        np.testing.assert_allclose(got, simplex_reference(v), atol=1e-12)
        keras_got = moco.project_onto_simplex(keras.ops.convert_to_tensor(v.astype("float32")))
        keras_got = keras.ops.convert_to_numpy(keras_got)
        np.testing.assert_allclose(keras_got, simplex_reference(v), atol=1e-6)


@pytest.mark.parametrize("options", [{}, OPTIONS])
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_is_the_algorithm_over_steps(num_tasks, options):
    """Five steps, the estimates, lambda and k carried: every direction and
    weight is the reference's (float32 rounding)."""
    steps = random_steps(num_tasks, 5)
    options = {k: v for k, v in options.items() if k != "head_update"}
    weighting = built(num_tasks, **options)
    expected = reference(steps, **{"beta": 0.99, "gamma": 0.1, **options})
    for k, ((want, weights_want), gradients) in enumerate(zip(expected, steps, strict=True)):
        directions, weights = aggregate(weighting, gradients)
        for got, expected in zip(directions, want, strict=True):
            error = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)
            measure("moco_vs_algorithm", error)
            assert error <= 1e-5, (k, error)
        np.testing.assert_allclose(weights, weights_want, atol=1e-6)


def test_loss_scale_is_divided_out():
    """Gradients scaled by 2^10 (a loss scale) with the unscaled Gram
    matrix, as the step passes them: the same state, the direction scaled
    by 2^10 (the optimizer divides it out)."""
    steps = random_steps(3, 3, seed=1)
    plain, scaled = built(3), built(3)
    for gradients in steps:
        gram = gram_of_gradients(gradients)
        d_plain, w_plain = aggregate(plain, gradients, gram=gram)
        d_scaled, w_scaled = aggregate(scaled, [g * 1024.0 for g in gradients], gram=gram)
        np.testing.assert_allclose(w_scaled, w_plain, rtol=1e-6)
        for a, b in zip(d_scaled, d_plain, strict=True):
            np.testing.assert_allclose(a, 1024.0 * b, rtol=1e-5, atol=1e-6 * np.abs(a).max())


# ------------------------------------------------------------ through fit


def test_fit_steps_are_the_reference():
    """Three `train_on_batch` steps of the tiny model: the trunk follows
    T sum_t lambda_t y_t with y_t tracking each task's gradient of the trunk
    weights, the heads their own gradients; the logged weights are T
    lambda."""
    x, y = tiny.data()
    model = tiny.model(MoCo(beta=0.5, gamma=0.5))
    ref = tiny.Reference(tiny.weights_of(model), x, y)
    estimates = [np.zeros((3, 6, 5)), np.zeros((3, 5))]
    lambdas = np.full(3, 1 / 3)
    for step in range(3):
        per_task, _ = ref.task_gradients()
        trunk = [np.stack([grads[i] for _, _, grads in per_task]) for i in range(2)]
        estimates = [e - 0.5 * (e - g) for e, g in zip(estimates, trunk, strict=True)]
        flat = np.concatenate([e.reshape(3, -1) for e in estimates], axis=1)
        lambdas = simplex_reference(lambdas - 0.5 * flat @ flat.T @ lambdas)
        ref.apply([3 * np.tensordot(lambdas, e, axes=1) for e in estimates], [head for _, head, _ in per_task])
        model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
        logs = model.train_on_batch(x, y, return_dict=True)
        got = tiny.weights_of(model)
        for name, values in ref.w.items():
            for a, b in zip(got[name], values, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} step {step}")
        np.testing.assert_allclose([logs[f"{t}_alpha"] for t in tiny.TASKS], 3 * lambdas, rtol=1e-5, atol=1e-6)


def test_skipped_step_leaves_the_estimates_untouched():
    """A non-finite step (skipped) changes neither the estimates, lambda
    nor the step count; the next step goes on from them."""
    x, y = tiny.data()
    model = tiny.model(MoCo(beta=0.5, gamma=0.5))
    model.on_nonfinite = "skip"
    model.train_on_batch(x, y)
    state = [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weighting.variables]
    assert np.any(state[0] != 0) and float(state[-1]) == 1.0
    logs = model.train_on_batch(x, dict(y, a=np.full_like(y["a"], np.nan)), return_dict=True)
    assert logs["skipped_steps"] == 1.0
    for before, variable in zip(state, model.weighting.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), before)
    model.reset_metrics()  # as `train_on_batch` does itself only since Keras 3.15
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["skipped_steps"] == 0.0 and float(keras.ops.convert_to_numpy(model.weighting.steps)) == 2.0


def test_projection_of_huge_entries():
    """A step of 1e15 (a task 1e8 larger than the others): without the
    shift to the largest entry the float32 sort formula returned [2, 0, 0]
    and then infinities; now the projection, exactly."""
    for v in ([-1e15, 0.3, 0.1], [1e15, 1e15 + 2**50, -3.0], [-1e15, -1e13, 0.3]):
        v = np.asarray(v, np.float32)
        got = np.asarray(keras.ops.convert_to_numpy(moco.project_onto_simplex(keras.ops.convert_to_tensor(v))))
        np.testing.assert_allclose(got, simplex_reference(v.astype(np.float64)), atol=1e-6)


def test_one_task_1e8_larger_stays_finite():
    """The tracked products are ~1e16: lambda stays on the simplex, the
    direction finite and at most T times the longest estimate."""
    rng = np.random.default_rng(1)
    weighting = built(3)
    for _ in range(4):
        step = [rng.standard_normal((3,) + s) for s in SHAPES]
        step = [g * np.array([1e8, 1.0, 1.0]).reshape((3,) + (1,) * len(s)) for g, s in zip(step, SHAPES)]
        directions, weights = aggregate(weighting, step)
        assert np.all(np.isfinite(weights)) and abs(weights.sum() - 3.0) < 1e-5
        longest = max(np.linalg.norm(np.concatenate([g.reshape(3, -1) for g in step], axis=1), axis=1))
        assert np.sqrt(sum(np.sum(d**2) for d in directions)) <= 3.0 * longest * (1 + 1e-5)
