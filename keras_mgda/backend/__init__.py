"""The gradient part of the train step, one module per Keras backend.

Nothing else in keras_mgda imports tensorflow, jax or torch."""

import keras


def _impl():
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
    return impl


def train_step(model, *args, **kwargs):
    """Runs `model`'s multi-task train step on the active Keras backend."""
    return _impl().train_step(model, *args, **kwargs)


def wrap_train_function(model, train_function):
    """Lets a backend check each call of Keras's train function (JAX raises
    on non-finite steps there, since a jitted step cannot)."""
    wrap = getattr(_impl(), "wrap_train_function", None)
    if wrap is None:
        return train_function
    return wrap(model, train_function)
