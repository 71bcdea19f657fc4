"""How the aggregator tests call a `GradientAggregator` as the train step
does: on float32 per-task gradients with their float32 Gram matrix,
compiled with jax.jit (its variables carried through a StatelessScope) or
tf.function (XLA optional), and eagerly on torch with the direct-torch
namespace."""

import keras
import numpy as np
from keras import ops

from ._calling import BACKEND

__all__ = ["aggregate", "gram_of_gradients", "uniform_draws"]


def gram_of_gradients(gradients):
    """The float32 Gram matrix of a list of (T, ...) gradients."""
    num_tasks = gradients[0].shape[0]
    flat = np.concatenate([np.asarray(g, np.float32).reshape(num_tasks, -1) for g in gradients], axis=1)
    return (flat.astype(np.float64) @ flat.T.astype(np.float64)).astype(np.float32)


_COMPILED = {}


def _compiled(aggregator, xla):
    key = (id(aggregator), xla)
    if key in _COMPILED:
        return _COMPILED[key]
    if BACKEND == "jax":
        import jax

        def stateless(values, gradients, losses, gram):
            mapping = list(zip(aggregator.variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                out = aggregator.aggregate(gradients, losses, gram)
            return out, [scope.get_current_value(v) for v in aggregator.variables]

        jitted = jax.jit(stateless)

        def call(gradients, losses, gram):
            out, values = jitted([v.value for v in aggregator.variables], gradients, losses, gram)
            for variable, value in zip(aggregator.variables, values, strict=True):
                variable.assign(value)
            return out

    elif BACKEND == "tensorflow":
        import tensorflow as tf

        call = tf.function(lambda g, losses, m: aggregator.aggregate(list(g), losses, m), jit_compile=xla)
    else:
        from keras_mgda.backend import torch_ops

        def call(gradients, losses, gram):
            tensors = [torch_ops.convert_to_tensor(g) for g in gradients]
            losses, gram = torch_ops.convert_to_tensor(losses), torch_ops.convert_to_tensor(gram)
            return aggregator.aggregate(tensors, losses, gram, ops=torch_ops)

    _COMPILED[key] = call
    return call


def aggregate(aggregator, gradients, losses=None, *, gram=None, xla=False):
    """`aggregator.aggregate` on float32 NumPy gradients.

    Args:
        aggregator: a built `GradientAggregator`.
        gradients: list of (T, ...) arrays.
        losses: (T,) losses (default ones).
        gram: the Gram matrix (default: of the gradients, in float32).
        xla: on TensorFlow, compile with XLA.

    Returns:
        `(directions, weights)` as float64 NumPy arrays (a list and a (T,)).
    """
    gradients = [np.asarray(g, np.float32) for g in gradients]
    num_tasks = gradients[0].shape[0]
    losses = np.ones(num_tasks, np.float32) if losses is None else np.asarray(losses, np.float32)
    gram = gram_of_gradients(gradients) if gram is None else np.asarray(gram, np.float32)
    directions, weights = _compiled(aggregator, xla)(gradients, losses, gram)
    directions = [np.asarray(ops.convert_to_numpy(d), np.float64) for d in directions]
    return directions, np.asarray(ops.convert_to_numpy(weights), np.float64)


def uniform_draws(seed, shapes):
    """The uniform draws of a fresh `keras.random.SeedGenerator(seed)`, one
    per shape, in order (what a seeded aggregator draws first)."""
    generator = keras.random.SeedGenerator(seed)
    return [np.asarray(ops.convert_to_numpy(keras.random.uniform(s, seed=generator)), np.float64) for s in shapes]
