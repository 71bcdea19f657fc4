"""The SciPy path for the same linear solve as `minres`: SciPy's
`scipy.sparse.linalg.minres` on a flattened NumPy vector, through a
`LinearOperator` whose matvec calls the operator on the model's tensors.

One host round trip per iteration (the vector to the device, the product
back), as in Ma et al.'s reference code. It runs in float64 on the host,
and SciPy's MINRES has its own stopping test (relative to an estimate of
||A|| ||x|| + ||b||), so it may stop before `minres` in `keras.ops` does.
"""

import keras
import numpy as np

__all__ = ["scipy_minres"]


def _flatten(tensors):
    return np.concatenate([np.asarray(keras.ops.convert_to_numpy(t), np.float64).ravel() for t in tensors])


def _unflatten(vector, like):
    out, start = [], 0
    for t in like:
        size = int(np.prod(t.shape))
        part = vector[start:start + size].reshape(tuple(t.shape))
        out.append(keras.ops.convert_to_tensor(part, dtype=t.dtype))
        start += size
    return out


def scipy_minres(operator, b, *, damping=0.0, max_iters=50, tol=1e-5):
    """Solves (A + damping I) x = b with `scipy.sparse.linalg.minres`.

    Args:
        operator: a function from a list of tensors to a list of tensors of
            the same shapes, linear and symmetric.
        b: the right-hand side, a list of tensors.
        damping: a scalar added to the operator's diagonal.
        max_iters: the most iterations.
        tol: SciPy's `rtol`.

    Returns:
        `(x, iterations, residual)` as `minres` returns them: x as tensors
        shaped like `b` and the operator applications; `residual` is NaN
        (SciPy does not return its estimate).

    Example:

    ```python
    a = np.array([[2.0, 1.0], [1.0, -3.0]], np.float32)
    x, iterations, residual = scipy_minres(lambda v: [a @ v[0]], [np.ones(2, np.float32)])
    ```
    """
    from scipy.sparse import linalg

    b = [keras.ops.convert_to_tensor(t) for t in b]
    size = sum(int(np.prod(t.shape)) for t in b)
    calls = [0]

    def matvec(vector):
        calls[0] += 1
        vector = np.asarray(vector, np.float64).ravel()
        return _flatten(operator(_unflatten(vector, b))) + damping * vector

    system = linalg.LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    rhs = _flatten(b)
    solution, _ = linalg.minres(system, rhs, rtol=tol, maxiter=max_iters)
    # SciPy keeps its residual estimate to itself; computing it would cost
    # one more operator application (a pass over the data).
    return _unflatten(solution, b), calls[0], float("nan")
