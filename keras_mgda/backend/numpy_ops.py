"""The `keras.ops` functions the weightings use, on NumPy arrays.

The eager torch step solves the small T x T problem of a stateless
gradient weighting (MGDA's min-norm point, CAGrad, IMTL-G, Nash-MTL,
UPGrad) on the host: the step reads its losses and Gram matrix once anyway
(to decide whether the step is finite), and a few hundred NumPy calls on a
40 x 40 matrix cost a fraction of as many torch calls (each a kernel
launch on a GPU, and the solver's loops read a value back every round).
Same algorithm, same code in `solvers.py` and `weighting/*.py`, given this
module as their `ops` argument.

Only the functions and signatures those modules use are here: any other
name raises AttributeError, so a weighting that needs one fails loudly in
its namespace test rather than mixing array types.
"""

import builtins

import numpy as np

__all__ = [
    "abs",
    "all",
    "any",
    "arange",
    "argmax",
    "cast",
    "clip",
    "concatenate",
    "convert_to_tensor",
    "diag",
    "diagonal",
    "eigh",
    "einsum",
    "exp",
    "eye",
    "floor_divide",
    "fori_loop",
    "full",
    "isfinite",
    "log",
    "log2",
    "logical_and",
    "logical_not",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "one_hot",
    "ones",
    "ones_like",
    "power",
    "reshape",
    "round",
    "solve",
    "sort",
    "sqrt",
    "square",
    "stop_gradient",
    "sum",
    "take",
    "take_along_axis",
    "transpose",
    "where",
    "while_loop",
    "zeros",
    "zeros_like",
]

_DTYPES = {}


def _dtype(dtype):
    if dtype is None:
        return None
    cached = _DTYPES.get(dtype)
    if cached is None:
        cached = np.dtype(getattr(dtype, "name", dtype))
        _DTYPES[dtype] = cached
    return cached


def _axes(axis):
    return axis if axis is None or isinstance(axis, int) else tuple(axis)


def _like(value, other):
    # Python scalars take the float dtype of the array beside them, as in
    # keras.ops (NumPy 2 does the same for arithmetic but not for `where`).
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        if isinstance(other, (np.ndarray, np.generic)) and other.dtype.kind == "f":
            return np.asarray(value, dtype=other.dtype)
    return value


def convert_to_tensor(x, dtype=None):
    if dtype is not None or isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x, dtype=_dtype(dtype))
    # Python values: float32 and int32, as keras.ops makes them.
    x = np.asarray(x)
    if x.dtype == np.float64:
        return x.astype(np.float32)
    if x.dtype == np.int64:
        return x.astype(np.int32)
    return x


def cast(x, dtype):
    return np.asarray(x).astype(_dtype(dtype), copy=False)


def stop_gradient(x):
    return x


def where(condition, x, y):
    x, y = _like(x, y), _like(y, x)
    if isinstance(x, (float, int)) and isinstance(y, (float, int)):
        x, y = convert_to_tensor(x), convert_to_tensor(y)
    return np.where(condition, x, y)


def sum(x, axis=None, keepdims=False):  # noqa: A001 (the keras.ops name)
    return np.sum(x, axis=_axes(axis), keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return np.mean(x, axis=_axes(axis), keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return np.max(x, axis=_axes(axis), keepdims=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return np.min(x, axis=_axes(axis), keepdims=keepdims)


def all(x, axis=None, keepdims=False):  # noqa: A001
    return np.all(x, axis=_axes(axis), keepdims=keepdims)


def any(x, axis=None, keepdims=False):  # noqa: A001
    return np.any(x, axis=_axes(axis), keepdims=keepdims)


def argmax(x, axis=None):
    return np.argmax(x, axis=axis).astype(np.int32)


def sort(x, axis=-1):
    return np.sort(x, axis=axis)


def ones_like(x, dtype=None):
    return np.ones_like(x, dtype=_dtype(dtype))


def zeros_like(x, dtype=None):
    return np.zeros_like(x, dtype=_dtype(dtype))


def ones(shape, dtype=None):
    return np.ones(shape, dtype=_dtype(dtype) or np.float32)


def zeros(shape, dtype=None):
    return np.zeros(shape, dtype=_dtype(dtype) or np.float32)


def full(shape, fill_value, dtype=None):
    return np.full(shape, fill_value, dtype=_dtype(dtype) or np.float32)


def eye(n, dtype=None):
    return np.eye(n, dtype=_dtype(dtype) or np.float32)


def diag(x):
    return np.diag(x)


def arange(n, dtype=None):
    return np.arange(n, dtype=_dtype(dtype))


def diagonal(x, offset=0, axis1=0, axis2=1):
    return np.diagonal(x, offset, axis1, axis2)


def concatenate(xs, axis=0):
    return np.concatenate(list(xs), axis=axis)


def reshape(x, shape):
    return np.reshape(x, shape)


def transpose(x, axes=None):
    return np.transpose(x, axes)


def take(x, indices, axis=None):
    return np.take(x, indices, axis=axis)


def take_along_axis(x, indices, axis=None):
    return np.take_along_axis(x, indices, axis=axis)


def clip(x, x_min, x_max):
    return np.clip(x, _like(x_min, x), _like(x_max, x))


def maximum(x, y):
    return np.maximum(_like(x, y), _like(y, x))


def power(x, y):
    return np.power(_like(x, y), _like(y, x))


def floor_divide(x, y):
    return np.floor_divide(x, y)


def matmul(x, y):
    return np.matmul(x, y)


def einsum(subscripts, *operands):
    return np.einsum(subscripts, *operands)


def solve(a, b):
    return np.linalg.solve(a, b)


def eigh(x):
    return np.linalg.eigh(x)


def abs(x):  # noqa: A001
    return np.abs(x)


def sqrt(x):
    return np.sqrt(x)


def square(x):
    return np.square(x)


def exp(x):
    return np.exp(x)


def log(x):
    return np.log(x)


def log2(x):
    return np.log2(x)


def round(x):  # noqa: A001
    return np.round(x)


def isfinite(x):
    return np.isfinite(x)


def logical_and(x, y):
    return np.logical_and(x, y)


def logical_not(x):
    return np.logical_not(x)


def one_hot(x, num_classes, dtype="float32"):
    return (np.arange(num_classes) == np.asarray(x)[..., None]).astype(_dtype(dtype))


def while_loop(cond, body, loop_vars, maximum_iterations=None):
    loop_vars = tuple(loop_vars)
    iteration = 0
    while (maximum_iterations is None or iteration < maximum_iterations) and builtins.bool(
        cond(*loop_vars)
    ):
        loop_vars = tuple(body(*loop_vars))
        iteration += 1
    return loop_vars


def fori_loop(lower, upper, body_fun, init_val):
    value = init_val
    for index in range(lower, upper):
        value = body_fun(index, value)
    return value
