"""Type aliases of keras_mgda's public signatures.

keras_mgda computes on whatever the active Keras backend gives it, so most
aliases name a role rather than a class:

- `Tensor`: a Keras, TensorFlow, JAX or torch tensor, or a NumPy array: a
  value with `shape` and `dtype`, as `keras.ops` functions return it.
- `ArrayLike`: anything `keras.ops.convert_to_tensor` (or `np.asarray`)
  accepts: a `Tensor`, a NumPy array, a Python scalar or nested lists.
- `Ops`: a namespace of array functions with the names and signatures of
  `keras.ops`: `keras.ops` itself (the default), or the eager fast paths
  `keras_mgda.backend.numpy_ops` and `keras_mgda.backend.torch_ops`; a
  module, or any object with those functions.
- `Shape`: a Keras shape, a tuple of ints with None for unknown sizes.
- `WeightingLike`: what `keras_mgda.weighting.get` accepts: a `Weighting`,
  a method's name, a config dict from `keras.saving.serialize_keras_object`,
  or None (MGDA).

They are aliases for readers and type checkers only: nothing is checked at
run time.
"""

from types import ModuleType
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeAlias

if TYPE_CHECKING:
    from keras_mgda.weighting.base import Weighting

__all__ = ["ArrayLike", "Ops", "Shape", "Tensor", "WeightingLike"]

Tensor: TypeAlias = Any  # a Keras, TensorFlow, JAX or torch tensor, or a NumPy array
ArrayLike: TypeAlias = Any  # a Tensor, a NumPy array, a Python scalar or nested lists
Ops: TypeAlias = ModuleType | Any  # `keras.ops`, or a namespace with its functions
Shape: TypeAlias = tuple[int | None, ...]
# A string: `Weighting` is imported for type checkers only (the weighting
# package imports the solvers, which import this module).
WeightingLike: TypeAlias = "Weighting | str | dict[str, Any] | None"
