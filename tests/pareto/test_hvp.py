"""The second-order backend primitives: exact Hessian-vector products and
per-task gradients, in inference mode, changing nothing."""

import keras
import numpy as np
import pytest

from keras_mgda import backend as mtl_backend
from keras_mgda.step import objectives

from ._problems import tiny_model

COEFFICIENTS = np.array([0.3, 0.7])

# Central differences of the gradient in a float64 model: step and relative
# tolerance. Keras computes matmuls in float32 on torch and JAX even in a
# float64 model (64-bit results are forced to 32 bits like JAX's default,
# keras/src/backend/common/dtypes.py), so the gradient is noisy at ~1e-8
# there and a larger step is best; TensorFlow keeps float64 throughout.
FINITE_DIFFERENCES = {"tensorflow": (1e-5, 1e-7), "torch": (1e-3, 1e-4), "jax": (1e-3, 1e-4)}


def _numpy(tensors):
    return [np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in tensors]


def _flat(tensors):
    return np.concatenate([t.ravel() for t in _numpy(tensors)])


def _unflat(vector, variables):
    out, start = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        out.append(keras.ops.convert_to_tensor(vector[start:start + size].reshape(v.shape), v.dtype))
        start += size
    return out


def _combined_gradient(model, variables, batch):
    _, grads = mtl_backend.task_gradients(model, variables, batch)
    return sum(c * _flat(g) for c, g in zip(COEFFICIENTS, grads))


def _finite_difference(model, variables, batch, direction, eps=None, of=_combined_gradient):
    """Central difference of `of(model, variables, batch)` (by default the
    combined gradient) along `direction`."""
    eps = FINITE_DIFFERENCES[keras.backend.backend()][0] if eps is None else eps
    start = [keras.ops.convert_to_numpy(v) for v in variables]
    moved = []
    for sign in (1.0, -1.0):
        for v, s, d in zip(variables, start, _unflat(direction, variables)):
            v.assign(s + sign * eps * keras.ops.convert_to_numpy(d))
        moved.append(of(model, variables, batch))
    for v, s in zip(variables, start):
        v.assign(s)
    return (moved[0] - moved[1]) / (2 * eps)


def _hvp(model, variables, batch, vector):
    return _flat(mtl_backend.hessian_vector_product(model, variables, batch, COEFFICIENTS, _unflat(vector, variables)))


def _dense_hessian(model, variables, batch):
    size = sum(int(np.prod(v.shape)) for v in variables)
    return np.stack([_hvp(model, variables, batch, np.eye(size)[j]) for j in range(size)], axis=1)


def _autodiff_hessian(model, plan, variables, batch):
    """The Hessian by the backend's own dense Hessian routine, on the
    losses as a function of the flat weights (independent of our
    forward-over-reverse or double-backward code)."""
    start = _flat([v.value for v in variables])
    batch = objectives.as_batch(batch)
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        def f(flat):
            mapping = list(zip(variables, _split_torch(flat, variables)))
            losses = objectives.inference_task_losses(model, plan, batch, mapping)
            return torch.sum(torch.as_tensor(COEFFICIENTS) * losses)

        return torch.autograd.functional.hessian(f, torch.as_tensor(start)).numpy()
    import jax
    import jax.numpy as jnp

    others = [v for v in model.variables if all(v is not w for w in variables)]

    def g(flat):
        pieces, offset = [], 0
        for v in variables:
            size = int(np.prod(v.shape))
            pieces.append(jnp.reshape(flat[offset:offset + size], v.shape))
            offset += size
        mapping = list(zip(variables, pieces)) + [(v, v.value) for v in others]
        return jnp.sum(jnp.asarray(COEFFICIENTS) * objectives.inference_task_losses(model, plan, batch, mapping))

    return np.asarray(jax.jit(jax.hessian(g))(jnp.asarray(start)))


def _split_torch(flat, variables):
    pieces, offset = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        pieces.append(flat[offset:offset + size].reshape(tuple(v.shape)))
        offset += size
    return pieces


def test_hvp_matches_finite_differences(float64):
    model, batch = tiny_model(batch_norm=False)
    variables = model.trainable_variables
    direction = np.random.default_rng(1).normal(size=sum(int(np.prod(v.shape)) for v in variables))
    exact = _hvp(model, variables, batch, direction)
    reference = _finite_difference(model, variables, batch, direction)
    error = np.linalg.norm(exact - reference) / np.linalg.norm(reference)
    print(f"HVP vs finite differences: relative error {error:.2e}")
    assert error <= FINITE_DIFFERENCES[keras.backend.backend()][1]


def test_hvp_with_batch_norm_matches_finite_differences():
    # float32 (see `tiny_model`): central differences of step 1e-2 are
    # good to about 1e-3 here.
    model, batch = tiny_model()
    variables = model.trainable_variables
    direction = np.random.default_rng(1).normal(size=sum(int(np.prod(v.shape)) for v in variables))
    exact = _hvp(model, variables, batch, direction)
    reference = _finite_difference(model, variables, batch, direction, eps=1e-2)
    error = np.linalg.norm(exact - reference) / np.linalg.norm(reference)
    print(f"HVP vs finite differences (BatchNorm, float32): relative error {error:.2e}")
    assert error <= 5e-3


def test_hvp_builds_the_dense_hessian(float64):
    model, batch = tiny_model(batch_norm=False)
    variables = model.trainable_variables
    hessian = _dense_hessian(model, variables, batch)
    size = hessian.shape[0]
    columns = [_finite_difference(model, variables, batch, np.eye(size)[j]) for j in range(size)]
    reference = np.stack(columns, axis=1)
    scale = np.abs(reference).max()
    errors = {"finite differences": np.abs(hessian - reference).max() / scale,
              "symmetry": np.abs(hessian - hessian.T).max() / scale}
    if keras.backend.backend() in ("torch", "jax"):
        autodiff = _autodiff_hessian(model, model.step_plan, variables, batch)
        errors["autodiff"] = np.abs(hessian - autodiff).max() / scale
    print("dense Hessian from HVPs, max error / max |H|:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["finite differences"] <= FINITE_DIFFERENCES[keras.backend.backend()][1]
    assert errors["symmetry"] <= 1e-6
    assert errors.get("autodiff", 0.0) <= 1e-6


def test_hvp_of_shared_weights_is_the_sub_block(float64):
    model, batch = tiny_model(batch_norm=False)
    everything = model.trainable_variables
    shared = model.encoder.trainable_variables
    positions = []
    offset = 0
    for v in everything:
        size = int(np.prod(v.shape))
        if any(v is s for s in shared):
            positions.extend(range(offset, offset + size))
        offset += size
    full = _dense_hessian(model, everything, batch)
    block = _dense_hessian(model, shared, batch)
    np.testing.assert_allclose(block, full[np.ix_(positions, positions)], rtol=0, atol=1e-12 * np.abs(full).max())


def _state(model):
    variables = model.variables + model.metrics_variables + model.optimizer.variables
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_primitives_change_nothing_and_use_inference_mode():
    model, batch = tiny_model()
    model.fit(batch[0], batch[1], batch_size=8, epochs=1, verbose=0)  # metrics, seeds, optimizer in use
    variables = model.trainable_variables
    before = _state(model)
    vectors = [keras.ops.ones(v.shape, v.dtype) for v in variables]
    first = _numpy(mtl_backend.hessian_vector_product(model, variables, batch, COEFFICIENTS, vectors))
    second = _numpy(mtl_backend.hessian_vector_product(model, variables, batch, COEFFICIENTS, vectors))
    losses, _ = mtl_backend.task_gradients(model, variables, batch)
    after = _state(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    for a, b in zip(first, second):  # no dropout: the same product twice
        np.testing.assert_array_equal(a, b)
    scores = model.evaluate(batch[0], batch[1], batch_size=len(batch[0]), verbose=0, return_dict=True)
    expected = [scores["a_loss"] * 1.0, scores["b_loss"] * 0.5]  # with loss_weights
    np.testing.assert_allclose(keras.ops.convert_to_numpy(losses), expected, rtol=1e-5)


def test_task_gradients_are_each_tasks_own():
    model, batch = tiny_model()
    variables = model.trainable_variables
    _, grads = mtl_backend.task_gradients(model, variables, batch)
    head_b = model.get_layer("b").kernel
    position = next(i for i, v in enumerate(variables) if v is head_b)
    assert np.all(keras.ops.convert_to_numpy(grads[0][position]) == 0)  # task a does not reach head b
    assert np.any(keras.ops.convert_to_numpy(grads[1][position]) != 0)


@pytest.mark.parametrize("shares", [[1.0], [0.25, 0.75]])
def test_hessian_solve_averages_batches(shares):
    model, (x, y) = tiny_model()
    variables = model.trainable_variables
    if len(shares) == 1:
        batches = [(x, y)]
    else:
        batches = [(x[:6], {k: v[:6] for k, v in y.items()}), (x[6:], {k: v[6:] for k, v in y.items()})]
    vectors = [keras.ops.ones(v.shape, v.dtype) for v in variables]
    parts = [_numpy(mtl_backend.hessian_vector_product(model, variables, b, COEFFICIENTS, vectors)) for b in batches]
    expected = [sum(s * p[k] for s, p in zip(shares, parts)) for k in range(len(variables))]
    apply = lambda operator, rhs: operator(rhs)  # the "solver" returns the averaged product
    got = _numpy(mtl_backend.hessian_solve(model, variables, batches, shares, COEFFICIENTS, vectors, apply))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _torch_problem(seed):
    """The tiny model, its plan, variables and batch in the step's form, and
    random torch vectors shaped like the variables: what the tests of
    torch_hvp's private paths feed them."""
    import torch

    model, batch = tiny_model()
    variables = model.trainable_variables
    rng = np.random.default_rng(seed)
    vectors = [torch.as_tensor(rng.normal(size=v.shape), dtype=torch.float32) for v in variables]
    return model, model.step_plan, variables, objectives.as_batch(batch), vectors


def test_torch_forward_over_reverse_matches_double_backward():
    if keras.backend.backend() != "torch":
        pytest.skip("torch's two Hessian-vector products")
    import torch

    from keras_mgda.backend import torch_hvp

    model, plan, variables, batch, vectors = _torch_problem(seed=2)
    coefficients = torch.as_tensor(COEFFICIENTS)
    forward = torch_hvp._forward_over_reverse(model, plan, variables, batch, coefficients, vectors)
    backward = torch_hvp._double_backward(model, plan, variables, batch, coefficients, vectors)
    for a, b in zip(forward, backward):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_weighted_gradient_is_the_combination_of_task_gradients():
    model, batch = tiny_model()
    variables = model.trainable_variables
    losses, combined = mtl_backend.weighted_gradient(model, variables, batch, COEFFICIENTS)
    task_losses, _ = mtl_backend.task_gradients(model, variables, batch)
    np.testing.assert_allclose(_numpy([losses])[0], _numpy([task_losses])[0], rtol=1e-6)
    np.testing.assert_allclose(_flat(combined), _combined_gradient(model, variables, batch), rtol=1e-5, atol=1e-7)


def test_task_jvp_matches_task_gradients_and_finite_differences(float64):
    # Forward mode against two independent references: reverse mode
    # (g_t . v) and central differences of the losses.
    model, batch = tiny_model(batch_norm=False)
    variables = model.trainable_variables
    direction = np.random.default_rng(3).normal(size=sum(int(np.prod(v.shape)) for v in variables))
    exact = _numpy([mtl_backend.task_jvp(model, variables, batch, _unflat(direction, variables))])[0]
    _, grads = mtl_backend.task_gradients(model, variables, batch)
    np.testing.assert_allclose(exact, [_flat(g) @ direction for g in grads], rtol=1e-5)

    def task_losses(model, variables, batch):
        return _numpy([mtl_backend.task_gradients(model, variables, batch)[0]])[0]

    reference = _finite_difference(model, variables, batch, direction, of=task_losses)
    np.testing.assert_allclose(exact, reference, rtol=FINITE_DIFFERENCES[keras.backend.backend()][1])


def test_torch_task_jvp_forward_matches_transposed_vjp():
    if keras.backend.backend() != "torch":
        pytest.skip("torch's two J v products")
    from keras_mgda.backend import torch_hvp

    model, plan, variables, batch, vectors = _torch_problem(seed=4)
    forward = torch_hvp._forward_jvp(model, plan, variables, batch, vectors)
    transposed = torch_hvp._transposed_vjp(model, plan, [v.value for v in variables], batch, vectors)
    np.testing.assert_allclose(forward.numpy(), transposed.numpy(), rtol=1e-4, atol=1e-6)
