"""How the weighting tests call a weighting: through keras.ops on the active
backend (compiled once per config and T with jax.jit or tf.function, as the
model's step runs it; plain calls on torch), through an explicit array
namespace (`numpy_ops`, `torch_ops`), or in float64.

The torch step solves the weightings with `solvable_on_host` on NumPy
arrays (`keras_mgda.backend.numpy_ops`). So on torch the property tests
take an `engine` fixture (conftest.py) with two values, "keras" and
"numpy", and pass it to `weigh`: the NumPy solve is held to the same
properties as the keras.ops one.
"""

import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting.pcgrad import PCGrad

__all__ = [
    "BACKEND",
    "ENGINES",
    "MEASURED",
    "compiled_function",
    "first_order",
    "make",
    "measure",
    "weigh",
    "weigh_in",
]

BACKEND = keras.backend.backend()
ENGINES = ["keras", "numpy"] if BACKEND == "torch" else ["keras"]

# Worst values seen by the tests, printed at the end of each module (-s).
MEASURED = {}


def measure(name, value):
    """Records `value` under `name` if it is the worst (largest) so far."""
    MEASURED[name] = max(MEASURED.get(name, -np.inf), float(value))


_COMPILED = {}
# Cheaper XLA compilation for the many small jitted functions (JAX).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _key(weighting, num_tasks, xla):
    config = json.dumps(weighting.get_config(), sort_keys=True, default=str)
    owner = id(weighting) if weighting.variables and BACKEND == "tensorflow" else None
    return (type(weighting).__name__, config, num_tasks, xla, owner)


def _compile(weighting, xla):
    """`weighting.__call__` compiled once per config and T: jax.jit (its
    variables, PCGrad's seed, carried through a StatelessScope, as in the
    model's JAX step) or tf.function; plain calls on torch."""
    if BACKEND == "jax":
        import jax

        def stateless(values, losses, gram):
            mapping = list(zip(weighting.variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                weights = weighting(losses, gram)
            return weights, [scope.get_current_value(v) for v in weighting.variables]

        options = {} if xla else {"compiler_options": FAST_COMPILE}
        compiled = jax.jit(stateless, **options)

        def call(w, losses, gram):
            weights, values = compiled([v.value for v in w.variables], losses, gram)
            for variable, value in zip(w.variables, values, strict=True):
                variable.assign(value)
            return weights

        return call
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # Closes over this instance (its variables, for PCGrad's seed: then
        # the cache is per instance); equal configs weigh alike otherwise.
        compiled = tf.function(weighting.__call__, jit_compile=xla)
        return lambda w, losses, gram: compiled(losses, gram)
    return lambda w, losses, gram: w(losses, gram)


def _host_weigh(weighting, losses, gram):
    with np.errstate(all="ignore"):
        weights = weighting(losses, gram, ops=numpy_ops)
    assert type(weights) is np.ndarray, type(weights)
    return weights


def weigh(weighting, gram, losses=None, *, engine="keras", xla=False, namespace=None):
    """The weighting's float32 weights for a numpy Gram matrix, as numpy.

    Args:
        weighting: the weighting.
        gram: (T, T) Gram matrix (rounded to float32).
        losses: (T,) losses (default ones).
        engine: "keras" (keras.ops, compiled on JAX and TensorFlow) or
            "numpy" (the torch step's host path: `numpy_ops`, for the
            weightings with `solvable_on_host`; keras.ops for the others).
        xla: on TensorFlow, compile with XLA.
        namespace: an array namespace (`keras.ops`, `torch_ops`) to call
            the weighting with directly and eagerly, whatever the engine.
    """
    gram = np.asarray(gram, np.float32)
    num_tasks = gram.shape[-1]
    losses = np.ones(num_tasks, np.float32) if losses is None else np.asarray(losses, np.float32)
    if namespace is not None:
        tensor = namespace.convert_to_tensor
        weights = weighting(tensor(losses), tensor(gram), ops=namespace)
        weights = np.asarray(ops.convert_to_numpy(weights))
    elif engine == "numpy" and weighting.solvable_on_host:
        weights = _host_weigh(weighting, losses, gram)
    else:
        assert engine in ("keras", "numpy"), engine
        key = _key(weighting, num_tasks, xla)
        if key not in _COMPILED:
            _COMPILED[key] = _compile(weighting, xla)
        weights = np.asarray(ops.convert_to_numpy(_COMPILED[key](weighting, losses, gram)))
    assert weights.shape == (num_tasks,) and weights.dtype == np.float32, (weights.shape, weights.dtype)
    return weights


def weigh_in(weighting, gram, dtype, path, losses=None):
    """The weights for an exact Gram matrix computed in `dtype`, as float64.

    Args:
        weighting: the weighting.
        gram: (T, T) float64 Gram matrix, exactly representable in `dtype`.
        dtype: "float32" or "float64" (the methods compute in float64 when
            given float64 input).
        path: "numpy" (`ops=numpy_ops`, NumPy arrays of `dtype`) or "keras"
            (keras.ops: in float32 as `weigh` runs it, compiled on JAX and
            TensorFlow; in float64 eagerly, on torch and TensorFlow).
        losses: (T,) losses (default ones).
    """
    gram = np.asarray(gram, np.float64)
    num_tasks = len(gram)
    assert np.array_equal(gram.astype(dtype).astype(np.float64), gram), "not exact in " + dtype
    losses = np.ones(num_tasks) if losses is None else np.asarray(losses, np.float64)
    if path == "numpy":
        weights = _host_weigh(weighting, losses.astype(dtype), gram.astype(dtype))
    elif dtype == "float32":
        weights = weigh(weighting, gram, losses)
    else:
        if BACKEND == "jax":
            pytest.skip("float64 keras.ops on JAX: covered by the NumPy path (jit per call is slow)")
        weights = weighting(ops.convert_to_tensor(losses, dtype), ops.convert_to_tensor(gram, dtype))
        weights = np.asarray(ops.convert_to_numpy(weights))
    assert weights.shape == (num_tasks,) and weights.dtype == np.dtype(dtype), (weights.shape, weights.dtype)
    return weights.astype(np.float64)


def compiled_function(function, num_tasks):
    """A module function compiled once per T (jax.jit / tf.function)."""
    key = (function.__module__, function.__name__, num_tasks)
    if key not in _COMPILED:
        if BACKEND == "jax":
            import jax

            function = jax.jit(function, compiler_options=FAST_COMPILE)
        elif BACKEND == "tensorflow":
            import tensorflow as tf

            function = tf.function(function)
        _COMPILED[key] = function
    return _COMPILED[key]


_INSTANCES = {}


def make(cls):
    """The default instance of `cls` (PCGrad(seed=5)), shared so that it is
    compiled once per T; PCGrad's seed state is reset to its first step."""
    if cls not in _INSTANCES:
        weighting = cls(seed=5) if cls is PCGrad else cls()
        _INSTANCES[cls] = (weighting, [ops.convert_to_numpy(v.value) for v in weighting.variables])
    weighting, initial = _INSTANCES[cls]
    for variable, value in zip(weighting.variables, initial, strict=True):
        variable.assign(value)
    return weighting


def first_order(seed, num_tasks):
    """The task order of a fresh PCGrad(seed=seed)'s first step."""
    generator = keras.random.SeedGenerator(seed)
    order = keras.random.shuffle(ops.arange(num_tasks, dtype="int32"), seed=generator)
    return np.asarray(ops.convert_to_numpy(order))
