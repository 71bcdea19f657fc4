"""The `keras.ops` functions the min-norm solver, the weightings and the
step's Gram matrix use, as direct torch calls.

Keras's torch ops convert and check every argument (about 20 us per op on a
CPU); the solver runs a few hundred small ops per step in eager torch, which
made it most of MGDA's overhead at T=40. The torch train step passes this
namespace as the solvers' and weightings' `ops` argument instead: the same
algorithm, the same code in `solvers.py`, without the per-op conversions.
Only the signatures the solver uses are covered; any other `keras.ops`
function is taken from Keras as is (the weighting modules use a few more).
"""

import keras
import numpy as np
import torch

from keras_mgda import _keras

# Eager loops are plain Python loops, the same for NumPy and torch.
from keras_mgda.backend.numpy_ops import while_loop  # noqa: F401

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
    "diagonal",
    "einsum",
    "eye",
    "isfinite",
    "log2",
    "matmul",
    "max",
    "maximum",
    "min",
    "one_hot",
    "ones_like",
    "power",
    "reshape",
    "round",
    "shape",
    "solve",
    "sqrt",
    "square",
    "stop_gradient",
    "sum",
    "take_along_axis",
    "tensordot",
    "transpose",
    "where",
    "zeros_like",
]

get_device, to_torch_dtype = _keras.torch_core_functions()


def _dtype(dtype):
    return None if dtype is None else to_torch_dtype(dtype)


def _dims(axis):
    return axis if axis is None or isinstance(axis, int) else tuple(axis)


def _as(value, like):
    if isinstance(value, torch.Tensor):
        return value
    if like is not None and isinstance(like, torch.Tensor) and like.is_floating_point():
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return torch.as_tensor(value, device=get_device())


def convert_to_tensor(x, dtype=None):
    if isinstance(x, keras.Variable):
        x = x.value
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(_dtype(dtype))
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
        return x.to(device=get_device(), dtype=_dtype(dtype) or x.dtype)
    return torch.as_tensor(x, dtype=_dtype(dtype), device=get_device())


def cast(x, dtype):
    return x.to(_dtype(dtype))


def where(condition, x, y):
    if not isinstance(x, torch.Tensor):
        x = _as(x, y)
    if not isinstance(y, torch.Tensor):
        y = _as(y, x)
    return torch.where(condition, x, y)


def _reduce(fn, x, axis, keepdims):
    if axis is None:
        out = fn(x)
        return out.reshape([1] * x.dim()) if keepdims else out
    return fn(x, dim=_dims(axis), keepdim=keepdims)


def sum(x, axis=None, keepdims=False):  # noqa: A001 (the keras.ops name)
    return _reduce(torch.sum, x, axis, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce(torch.amax, x, axis, keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce(torch.amin, x, axis, keepdims)


def _reduce_bool(fn, x, axis, keepdims):
    # torch.all/any take one dim at a time.
    x = x.to(torch.bool)
    if axis is None:
        out = fn(x)
        return out.reshape([1] * x.dim()) if keepdims else out
    for dim in sorted(_normalize_axes(axis, x.dim()), reverse=True):
        x = fn(x, dim=dim, keepdim=keepdims)
    return x


def all(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce_bool(torch.all, x, axis, keepdims)


def any(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce_bool(torch.any, x, axis, keepdims)


def _normalize_axes(axis, ndim):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return [a % ndim for a in axes]


def argmax(x, axis=None):
    return torch.argmax(x, dim=axis)


def ones_like(x, dtype=None):
    return torch.ones_like(x, dtype=_dtype(dtype))


def zeros_like(x, dtype=None):
    return torch.zeros_like(x, dtype=_dtype(dtype))


def eye(n, dtype=None):
    return torch.eye(n, dtype=_dtype(dtype) or torch.float32, device=get_device())


def arange(n, dtype=None):
    return torch.arange(n, dtype=_dtype(dtype), device=get_device())


def diagonal(x, offset=0, axis1=0, axis2=1):
    return torch.diagonal(x, offset=offset, dim1=axis1, dim2=axis2)


def concatenate(xs, axis=0):
    return torch.cat(list(xs), dim=axis)


def take_along_axis(x, indices, axis=None):
    return torch.take_along_dim(x, indices, dim=axis)


def clip(x, x_min, x_max):
    return torch.clamp(x, x_min, x_max)


def maximum(x, y):
    return torch.maximum(_as(x, y), _as(y, x))


def power(x, y):
    return torch.pow(x, y)


def solve(a, b):
    return torch.linalg.solve(a, b)


def stop_gradient(x):
    return x.detach()


def abs(x):  # noqa: A001
    return torch.abs(x)


def sqrt(x):
    return torch.sqrt(x)


def square(x):
    return torch.square(x)


def log2(x):
    return torch.log2(x)


def round(x):  # noqa: A001
    return torch.round(x)


def isfinite(x):
    return torch.isfinite(x)


def shape(x):
    return tuple(x.shape)


def reshape(x, new_shape):
    return torch.reshape(x, tuple(new_shape))


def transpose(x, axes=None):
    return x.permute(*reversed(range(x.dim()))) if axes is None else x.permute(*axes)


def matmul(x, y):
    return torch.matmul(x, y)


def tensordot(x, y, axes=2):
    return torch.tensordot(x, y, dims=axes)


def einsum(subscripts, *operands):
    return torch.einsum(subscripts, *operands)


def one_hot(x, num_classes, dtype="float32"):
    return torch.nn.functional.one_hot(x.long(), num_classes).to(_dtype(dtype))


def __getattr__(name):
    # Anything not written out above: Keras's own op.
    return getattr(keras.ops, name)
