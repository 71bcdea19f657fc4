"""The gradient part of the train step, one module per Keras backend.

Nothing else in keras_mgda imports tensorflow, jax or torch."""

import keras


def train_step(model, *args, **kwargs):
    """Runs `model`'s multi-task train step on the active Keras backend."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_mgda.backend import tensorflow as impl
    elif name == "jax":
        from keras_mgda.backend import jax as impl
    elif name == "torch":
        from keras_mgda.backend import torch as impl
    else:
        raise NotImplementedError(
            f"keras_mgda does not support the {name!r} backend; use "
            "tensorflow, jax or torch (set KERAS_BACKEND)."
        )
    return impl.train_step(model, *args, **kwargs)
