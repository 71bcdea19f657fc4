"""Small array helpers shared by the solvers and the gradient weightings.

Every function computes with the namespace of array functions it is given,
`ops`: `keras.ops` itself, or one of the eager fast paths of the torch step
(`keras_mgda.backend.numpy_ops`, `keras_mgda.backend.torch_ops`), which
have the same names and signatures. Passing it explicitly keeps the code
free of global state: the same solver runs on Keras tensors, NumPy arrays
or torch tensors depending only on what its caller passes.

A few helpers exist because Keras's backends differ: its torch backend
returns float32 from `maximum`, `minimum` and `floor` even for float64
tensors and rounds Python scalars in `where` to float32; its JAX `argmin` /
`argmax` compare float64 values in float32. Hence the `where`-based
versions below, and typed constants wherever a scalar is not exact in
float32.
"""

import numpy as np
from keras import backend

from keras_mgda.types import ArrayLike
from keras_mgda.types import Ops
from keras_mgda.types import Tensor

__all__ = [
    "argmax",
    "argmin",
    "const",
    "dot",
    "eps",
    "float_dtype",
    "matvec",
    "maximum",
    "minimum",
    "one_hot",
    "power_of_two_near",
]

_FLOAT_DTYPES = {}


def float_dtype(x: Tensor) -> str:
    """The float dtype name of `x` (`floatx()` for integer input).

    Cached: `standardize_dtype` costs ~15 us, and the eager solvers ask for
    it a few times per loop round.
    """
    key = (x.dtype, backend.floatx())
    dtype = _FLOAT_DTYPES.get(key)
    if dtype is None:
        dtype = backend.standardize_dtype(x.dtype)
        if "float" not in dtype:
            dtype = backend.floatx()
        _FLOAT_DTYPES[key] = dtype
    return dtype


def eps(dtype: str) -> float:
    """Machine epsilon of a float dtype name, as a Python float."""
    return float(np.finfo(dtype).eps)


def const(value: ArrayLike, like: Tensor, *, ops: Ops) -> Tensor:
    """`value` as a tensor of `like`'s float dtype (an `ops.cast` of a
    Python float goes through float32 on TensorFlow)."""
    return ops.convert_to_tensor(value, dtype=float_dtype(like))


def maximum(x: Tensor, y: Tensor, *, ops: Ops) -> Tensor:
    """Elementwise maximum that keeps the dtype; NaN in `x` propagates."""
    return ops.where(x < y, y, x)


def minimum(x: Tensor, y: Tensor, *, ops: Ops) -> Tensor:
    """Elementwise minimum that keeps the dtype; NaN in `x` propagates."""
    return ops.where(x > y, y, x)


def argmin(x: Tensor, *, ops: Ops) -> Tensor:
    """Index of the first minimum along the last axis, compared exactly."""
    return ops.argmax(ops.cast(x == ops.min(x, axis=-1, keepdims=True), "int32"), axis=-1)


def argmax(x: Tensor, *, ops: Ops) -> Tensor:
    """Index of the first maximum along the last axis, compared exactly."""
    return ops.argmax(ops.cast(x == ops.max(x, axis=-1, keepdims=True), "int32"), axis=-1)


def matvec(matrix: Tensor, vector: Tensor, *, ops: Ops) -> Tensor:
    """(..., T, T) x (..., T) -> (..., T), broadcasting the batch axes.

    Written as a product and a sum: Keras's torch `einsum` costs about ten
    small ops, and for the T x T problems here the sum is as fast anywhere.
    """
    return ops.sum(matrix * vector[..., None, :], axis=-1)


def diagonal_matrix(vector: Tensor, *, ops: Ops) -> Tensor:
    """(T,) -> (T, T) with `vector` on the diagonal, zeros elsewhere (also
    where an entry is infinite).

    Not `ops.diag`: Keras's TensorFlow `diag` up to 3.12 wraps it in a
    `tf.cond` on the vector's size, which XLA cannot follow into a solve.
    """
    eye = ops.eye(vector.shape[-1], dtype=vector.dtype)
    return ops.where(eye > 0, vector[None, :], ops.zeros_like(eye))


def dot(x: Tensor, y: Tensor, *, ops: Ops) -> Tensor:
    """Inner product along the last axis."""
    return ops.sum(x * y, axis=-1)


def one_hot(index: Tensor, num_tasks: int, dtype: str, *, ops: Ops) -> Tensor:
    """One-hot rows for integer indices (`ops.one_hot` is slow on torch)."""
    tasks = ops.arange(num_tasks, dtype="int32")
    return ops.cast(tasks == ops.cast(index, "int32")[..., None], dtype)


def power_of_two_near(x: Tensor, *, ops: Ops) -> Tensor:
    """2**round(log2(x)) for x > 0: dividing by it is exact. (Rounded, not
    floored: log2 of an exact power of two may come out a hair low.)"""
    return ops.power(const(2.0, x, ops=ops), ops.round(ops.log2(x)))
