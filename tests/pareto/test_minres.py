"""MINRES in keras.ops and the SciPy path against dense solves."""

import keras
import numpy as np
import pytest

from keras_mgda import backend as mtl_backend
from keras_mgda.pareto import minres
from keras_mgda.pareto import scipy_minres

from ._problems import tiny_model

# MINRES's arithmetic: once, under torch (tests/conftest.py); tracing it and
# the Hessian-vector products are backend-specific (`all_backends`).
pytestmark = pytest.mark.one_backend

SOLVERS = {"keras": minres, "scipy": scipy_minres}


def _system(kind, size=12, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(size, size)))[0]
    if kind == "spd":
        eigenvalues = rng.uniform(0.5, 5.0, size)
    else:  # indefinite: a third of the spectrum negative
        eigenvalues = np.concatenate([rng.uniform(-3.0, -0.5, size // 3), rng.uniform(0.5, 4.0, size - size // 3)])
    return (basis * eigenvalues) @ basis.T, rng.normal(size=size)


def _operator(matrix, shapes):
    """The matrix as an operator on a list of tensors of `shapes`."""
    a = keras.ops.convert_to_tensor(matrix.astype(np.float32))
    sizes = [int(np.prod(s)) for s in shapes]

    def apply(vectors):
        flat = keras.ops.concatenate([keras.ops.reshape(v, (-1,)) for v in vectors])
        product = keras.ops.matmul(a, flat)
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(keras.ops.reshape(product[start:start + size], shape))
            start += size
        return out

    return apply


def _split(vector, shapes):
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(vector[start:start + size].reshape(shape).astype(np.float32))
        start += size
    return out


def _flat(tensors):
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(t)) for t in tensors]).astype(np.float64)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("kind", ["spd", "indefinite"])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_solves_small_systems(solver, kind, damping):
    matrix, rhs = _system(kind)
    shapes = [(3, 2), (6,)]  # a list of tensors, as model weights are
    x, iterations, _ = SOLVERS[solver](_operator(matrix, shapes), _split(rhs, shapes), damping=damping,
                                       max_iters=100, tol=1e-7)
    expected = np.linalg.solve(matrix + damping * np.eye(len(rhs)), rhs)
    error = np.linalg.norm(_flat(x) - expected) / np.linalg.norm(expected)
    assert error <= 1e-5, error
    assert int(iterations) <= 24  # 12 in exact arithmetic; float32 loses orthogonality


def test_stops_at_max_iters_and_reports_the_residual():
    matrix, rhs = _system("indefinite", size=40)
    shapes = [(40,)]
    x, iterations, residual = minres(_operator(matrix, shapes), _split(rhs, shapes), max_iters=5, tol=1e-12)
    assert int(iterations) == 5
    true_residual = np.linalg.norm(rhs - matrix @ _flat(x)) / np.linalg.norm(rhs)
    np.testing.assert_allclose(float(residual), true_residual, rtol=1e-3)


def test_zero_right_hand_side_gives_zero():
    matrix, _ = _system("spd")
    shapes = [(12,)]
    for solver in SOLVERS.values():
        x, iterations, _ = solver(_operator(matrix, shapes), [np.zeros(12, np.float32)])
        assert int(iterations) == 0
        assert np.all(_flat(x) == 0)


@pytest.mark.all_backends  # jax.jit / tf.function
def test_traces_into_a_compiled_function():
    backend = keras.backend.backend()
    matrix, rhs = _system("indefinite")
    shapes = [(12,)]
    operator = _operator(matrix, shapes)
    solve = lambda b: minres(operator, [b], damping=0.1, max_iters=30, tol=1e-7)[0][0]
    if backend == "jax":
        import jax

        compiled = jax.jit(solve)
    elif backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(solve)
    else:
        pytest.skip("torch runs eagerly")
    x = compiled(keras.ops.convert_to_tensor(rhs.astype(np.float32)))
    expected = np.linalg.solve(matrix + 0.1 * np.eye(12), rhs)
    assert np.linalg.norm(_flat([x]) - expected) <= 1e-5 * np.linalg.norm(expected)


@pytest.mark.all_backends  # the backend's Hessian-vector products
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solves_a_small_models_damped_hessian_system(solver):
    model, batch = tiny_model(batch_norm=False)
    variables = model.trainable_variables
    coefficients = np.array([0.4, 0.6])
    size = sum(int(np.prod(v.shape)) for v in variables)
    shapes = [tuple(v.shape) for v in variables]
    operator = lambda vectors: mtl_backend.hessian_vector_product(model, variables, batch, coefficients, vectors)
    dense = np.stack([_flat(operator(_split(np.eye(size)[j], shapes))) for j in range(size)], axis=1)
    dense = (dense + dense.T) / 2
    rhs = np.random.default_rng(0).normal(size=size)
    damping = 0.1
    # min |eig| of H + damping I: an indefinite system at an untrained point
    print("eigenvalues of H + damping I:", np.linalg.eigvalsh(dense + damping * np.eye(size))[[0, -1]])
    expected = np.linalg.solve(dense + damping * np.eye(size), rhs)
    settings = dict(damping=damping, max_iters=4 * size, tol=1e-8)
    if solver == "keras":  # as `explore` runs it: one compiled solve on JAX
        x, iterations, _ = mtl_backend.hessian_solve(
            model, variables, [batch], [1.0], coefficients, _split(rhs, shapes), minres, **settings)
    else:
        x, iterations, _ = scipy_minres(operator, _split(rhs, shapes), **settings)
    error = np.linalg.norm(_flat(x) - expected) / np.linalg.norm(expected)
    print(f"{solver} MINRES on the damped Hessian: relative error {error:.1e} in {int(iterations)} iterations")
    assert error <= 1e-3
