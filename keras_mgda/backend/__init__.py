"""What differs between the Keras backends, one module each: how to
differentiate, how a compiled step applies or skips, how replicas agree.

Nothing else in keras_mgda imports tensorflow, jax or torch.
"""

import keras

__all__ = ["prepare_plan", "train_step", "wrap_train_function"]


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
    """Lets a backend check each call of Keras's train function: a compiled
    step records a non-finite step and the wrapper raises; an error that
    escapes a step leaves the model's state as it was before that step."""
    return _impl().wrap_train_function(model, train_function)


def prepare_plan(plan, model):
    """Lets a backend prepare what it keeps for a new `StepPlan` (called
    once per compilation, after the weighting is built, in the context the
    model is built in: under its distribution strategy's scope on TF)."""
    prepare = getattr(_impl(), "prepare_plan", None)
    if prepare is not None:
        prepare(plan, model)
