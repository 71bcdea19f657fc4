"""The private parts of Keras that keras_mgda relies on, in one place.

Keras has no public API for the per-output losses of a compiled model, for
running a functional graph without its `__call__` overhead, or for handing
JAX's detached training state back to the model; keras_mgda reads them from
Keras's internals. Every such access goes through a function here, which
names what it needs and fails with a clear message when a Keras release
moves it. Written against Keras 3.10 and later; tested with Keras 3.15.
"""

from collections.abc import Callable
from typing import Any

import keras

from keras_mgda.types import Tensor

__all__ = [
    "additional_loss",
    "compile_loss",
    "compile_loss_trackers",
    "compile_metrics",
    "metrics_by_output",
    "compute_loss",
    "distribute_strategy",
    "epoch_dataset",
    "flat_losses",
    "inputs_struct",
    "loss_tracker",
    "outputs_struct",
    "run_through_graph",
    "set_jax_state",
    "symbolic_build",
    "torch_core_functions",
]

CHECKED = "3.10 to 3.15"


def _missing(what):
    return RuntimeError(
        f"keras_mgda needs Keras's private {what}, which Keras "
        f"{keras.__version__} does not have (keras_mgda was checked with Keras "
        f"{CHECKED}). Install a Keras version in that range, or report it at "
        "keras_mgda's issue tracker."
    )


def _attribute(owner, name, what=None):
    try:
        return getattr(owner, name)
    except AttributeError:
        raise _missing(what or f"`{type(owner).__name__}.{name}`") from None


def flat_losses(compile_loss: Any) -> list[Any]:
    """`CompileLoss._flat_losses`: a list of (path, loss, weight, name)
    named tuples, one per output compiled with a loss (Keras 3.7+)."""
    return _attribute(compile_loss, "_flat_losses", "`CompileLoss._flat_losses`")


def compile_loss(model: keras.Model) -> Any:
    """The model's `CompileLoss`, or None when compiled without a loss."""
    return _attribute(model, "_compile_loss")


def compile_loss_trackers(model: keras.Model) -> list[keras.metrics.Metric]:
    """The `<output>_loss` metrics that Keras's compiled loss updates."""
    compile_loss = _attribute(model, "_compile_loss")
    if compile_loss is None:
        return []
    return [m for m in getattr(compile_loss, "metrics", []) if m is not None]


def compile_metrics(model: keras.Model) -> Any:
    """The model's `CompileMetrics`, or None."""
    return _attribute(model, "_compile_metrics")


def metrics_by_output(compile_metrics: Any) -> list[tuple[str | None, keras.metrics.Metric]]:
    """(output name, metric) for every compiled metric, from
    `CompileMetrics._flat_metrics` / `_flat_weighted_metrics` (one entry
    per flattened output); the name is None where Keras has none."""
    if not compile_metrics.built:
        return []
    names = list(getattr(compile_metrics, "output_names", None) or [])
    pairs = []
    for flat in ("_flat_metrics", "_flat_weighted_metrics"):
        for index, entry in enumerate(_attribute(compile_metrics, flat, f"`CompileMetrics.{flat}`")):
            metrics = getattr(entry, "metrics", [] if entry is None else [entry])
            name = names[index] if index < len(names) else None
            pairs.extend((name, metric) for metric in metrics)
    return pairs


def loss_tracker(model: keras.Model) -> keras.metrics.Mean:
    """The `Mean` metric that logs the total loss as `loss`."""
    return _attribute(model, "_loss_tracker")


def compute_loss(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Tensor:
    """`model.compute_loss` as Keras's own train steps call it (training)."""
    method = _attribute(model, "_compute_loss")
    return method(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def additional_loss(model: keras.Model) -> Tensor | None:
    """The sum of the model's `add_loss` and regularisation terms, or None."""
    aggregate = _attribute(model, "_aggregate_additional_loss")
    extra = [aggregate(loss) for loss in model.losses]
    if not extra:
        return None
    return keras.ops.sum(keras.ops.stack(extra))


def outputs_struct(model: keras.Model) -> Any:
    """The functional model's outputs, in the structure it was built with."""
    return _attribute(model, "_outputs_struct")


def inputs_struct(model: keras.Model) -> Any:
    """The functional model's inputs, in the structure it was built with."""
    return _attribute(model, "_inputs_struct")


def distribute_strategy(model: keras.Model) -> Any:
    """The TensorFlow trainer's explicit distribution strategy, or None."""
    return _attribute(model, "_distribute_strategy")


def epoch_dataset(iterator: Any) -> Any:
    """The `tf.data` dataset a TensorFlow `fit` epoch iterates over, or
    None where the iterator keeps none (not a TensorFlow epoch iterator)."""
    return getattr(iterator, "_distributed_dataset", None)


def symbolic_build(model: keras.Model, data_batch: Any) -> None:
    """Builds the compiled loss and metrics from one batch, as `fit` does."""
    return _attribute(model, "_symbolic_build")(data_batch=data_batch)


def _training_call(operation):
    if not getattr(operation, "_call_has_training_arg", False):
        return operation

    def call(*args, **kwargs):
        kwargs["training"] = True
        return operation(*args, **kwargs)

    return call


def run_through_graph(functional: keras.Model, inputs: Any) -> Any:
    """`functional(inputs, training=True)` through its graph directly: the
    functional model's own `__call__` (input checks, scopes) costs about
    0.4 ms per call in eager torch, more than a small head's layers."""
    run = getattr(functional, "_run_through_graph", None)
    if run is None:
        return functional(inputs, training=True)
    return run(inputs, operation_fn=_training_call)


def set_jax_state(model: keras.Model, state: tuple[Any, Any, Any, Any]) -> None:
    """Writes a JAX train function's `(trainable, non_trainable, optimizer,
    metrics)` state back onto the model's variables: during `fit` Keras
    keeps them detached (even purged) until the epoch ends."""
    trainable, non_trainable, optimizer_values, metrics_values = state
    model._jax_state = {
        "trainable_variables": trainable,
        "non_trainable_variables": non_trainable,
        "optimizer_variables": optimizer_values,
        "metrics_variables": metrics_values,
    }
    model._jax_state_synced = False
    _attribute(model, "jax_state_sync")()


def torch_core_functions() -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """Keras's torch backend's `get_device()` (the device it puts new
    tensors on) and `to_torch_dtype(name)`."""
    from keras.src.backend.torch import core

    where = "`keras.src.backend.torch.core.{}`"
    return (
        _attribute(core, "get_device", where.format("get_device")),
        _attribute(core, "to_torch_dtype", where.format("to_torch_dtype")),
    )
