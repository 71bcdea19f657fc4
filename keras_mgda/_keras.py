"""The private parts of Keras that keras_mgda relies on, in one place.

Keras has no public API for the per-output losses of a compiled model, for
running a functional graph without its `__call__` overhead, for walking the
layer graph, or for handing JAX's detached training state back to the
model; keras_mgda reads them from Keras's internals. Every such access goes
through a function here, which names what it needs and fails with a clear
message when a Keras release moves it. `INTERNALS` lists each private name
with what it is for; `tests/test_keras_internals.py` checks the list against
the installed Keras, so that a release that moves one fails in our suite.

The supported Keras versions are `KERAS_FLOOR` and later (`check_version`,
called when keras_mgda is imported); every release from the floor to
`KERAS_NEWEST_TESTED` is tested (docs/installation.md).
"""

import collections
from collections.abc import Callable
from typing import Any

import keras

from keras_mgda.types import Tensor

__all__ = [
    "INTERNALS",
    "KERAS_FLOOR",
    "KERAS_NEWEST_TESTED",
    "additional_loss",
    "check_version",
    "compile_loss",
    "compile_loss_trackers",
    "compile_metrics",
    "metrics_by_output",
    "compute_loss",
    "distribute_strategy",
    "epoch_dataset",
    "flat_losses",
    "inbound_nodes",
    "inputs_struct",
    "keras_history",
    "layer_own_state",
    "print_message",
    "track_sublayer",
    "loss_tracker",
    "outputs_struct",
    "reduces_across_workers",
    "run_through_graph",
    "set_jax_state",
    "symbolic_build",
    "torch_core_functions",
]

# The oldest Keras whose internals below keras_mgda supports, and the newest
# release the suite has run on.
KERAS_FLOOR = (3, 10)
KERAS_NEWEST_TESTED = (3, 15)

Internal = collections.namedtuple("Internal", ["owner", "name", "backend", "note"])
Internal.__doc__ = """One private Keras name keras_mgda touches: `owner` is the
kind of object that has it, `backend` the only backend it exists on (None:
all), `note` what keras_mgda uses it for."""

INTERNALS = (
    Internal("Trainer", "_compile_loss", None, "the compiled loss, whose entries give the per-task losses"),
    Internal("Trainer", "_compile_metrics", None, "the compiled metrics, updated after a taken step"),
    Internal("Trainer", "_loss_tracker", None, "the `loss` Mean, updated after a taken step"),
    Internal("Trainer", "_compute_loss", None, "the total loss as Keras's own train steps compute it"),
    Internal("Trainer", "_aggregate_additional_loss", None, "the `add_loss` and regularisation terms"),
    Internal("Trainer", "_symbolic_build", None, "builds the compiled loss; overridden to build the plan"),
    Internal("TensorFlowTrainer", "_maybe_symbolic_build", "tensorflow", "overridden to build before tracing"),
    Internal("TensorFlowTrainer", "_distribute_strategy", "tensorflow", "whether `fit` runs under tf.distribute"),
    Internal("TFEpochIterator", "_distributed_dataset", "tensorflow", "the dataset to build from under a strategy"),
    Internal("JAXTrainer", "jax_state_sync", "jax", "writes the detached JAX state back to the variables"),
    Internal("JAXTrainer", "_jax_state", "jax", "the detached state `jax_state_sync` reads (written)"),
    Internal("JAXTrainer", "_jax_state_synced", "jax", "whether that state is written back (written)"),
    Internal("CompileLoss", "_flat_losses", None, "(path, loss, loss_weights, name) per output with a loss"),
    Internal("Functional", "_outputs_struct", None, "the outputs in the structure the model was built with"),
    Internal("Functional", "_inputs_struct", None, "the inputs likewise, to build the encoder"),
    Internal("Functional", "_run_through_graph", None, "runs the heads without `__call__`'s overhead"),
    Internal("Layer", "_call_has_training_arg", None, "whether to pass `training=True` to a layer"),
    Internal("Layer", "_inbound_nodes", None, "the layer graph, to find Z; how often a layer is called"),
    Internal("Layer", "_trainable_variables", None, "a weighting's own variables, to save them"),
    Internal("Layer", "_non_trainable_variables", None, "likewise"),
    Internal("Layer", "_seed_generators", None, "a weighting's random state, to save it"),
    Internal("Layer", "_layers", None, "the tracked sub-layers; the weighting joins them (Keras < 3.11)"),
    Internal("KerasTensor", "_keras_history", None, "the operation and node that made a symbolic tensor"),
    Internal("torch core", "get_device", "torch", "the device Keras puts new torch tensors on"),
    Internal("torch core", "to_torch_dtype", "torch", "a Keras dtype name as a torch dtype"),
)


def _version_tuple(version):
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version(version: str | None = None) -> None:
    """Raises `ImportError` when the installed Keras is older than
    `KERAS_FLOOR` (older releases train wrongly, not loudly).

    Args:
        version: a Keras version string; default `keras.__version__`.
    """
    version = keras.__version__ if version is None else version
    if _version_tuple(version) >= KERAS_FLOOR:
        return
    floor = ".".join(map(str, KERAS_FLOOR))
    raise ImportError(
        f"keras_mgda needs Keras {floor} or newer (tested with Keras "
        f"{_tested_range()}), but Keras {version} is installed. Upgrade it with:\n"
        f'    pip install --upgrade "keras>={floor}"'
    )


def _tested_range():
    return f"{'.'.join(map(str, KERAS_FLOOR))} to {'.'.join(map(str, KERAS_NEWEST_TESTED))}"


check_version()


def _missing(what):
    return RuntimeError(
        f"keras_mgda needs Keras's private {what}, which Keras "
        f"{keras.__version__} does not have (keras_mgda was tested with Keras "
        f"{_tested_range()}). Install a Keras version in that range, or report it at "
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


def keras_history(tensor: Any) -> tuple[Any, int, int] | None:
    """`(operation, node_index, tensor_index)` of the node that made a
    symbolic tensor, or None for a tensor no layer made."""
    return getattr(tensor, "_keras_history", None)


def inbound_nodes(operation: Any) -> list[Any]:
    """The nodes of a layer or operation, one per call in a functional graph."""
    return _attribute(operation, "_inbound_nodes")


def track_sublayer(model: keras.Model, layer: keras.layers.Layer) -> None:
    """Makes `layer` one of `model`'s sub-layers after construction.

    Setting it as an attribute tracks it, except on Keras releases whose
    `Functional.__init__` replaced `_layers` with an untracked list (3.10):
    there the layer's variables would miss `trainable_variables` (never
    trained) and the step's saved state (never restored on a bad step).
    """
    layers = _attribute(model, "_layers")
    if not any(known is layer for known in layers):
        layers.append(layer)


def print_message(message: str) -> None:
    """Prints like Keras's progress bars: to stdout, or to absl logging when
    interactive logging is off (`keras.config.disable_interactive_logging`)."""
    try:
        from keras.src.utils.io_utils import print_msg
    except ImportError:  # pragma: no cover - a Keras that moved it
        print_msg = print
    print_msg(message)


def layer_own_state(layer: keras.layers.Layer) -> list[keras.Variable]:
    """A layer's own trainable and non-trainable variables (not its
    sub-layers'), then its seed generators' states, in that order."""
    return (
        list(_attribute(layer, "_trainable_variables"))
        + list(_attribute(layer, "_non_trainable_variables"))
        + [generator.state for generator in _attribute(layer, "_seed_generators")]
    )


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


def reduces_across_workers(strategy: Any) -> bool:
    """Whether Keras's TensorFlow trainer treats `strategy` as spanning
    several workers (`MultiWorkerMirroredStrategy` with more than one), where
    it reduces each step's logs with `strategy.reduce(..., axis=0)`."""
    from keras.src.backend.tensorflow import trainer

    where = "`keras.src.backend.tensorflow.trainer._collective_all_reduce_multi_worker`"
    check = _attribute(trainer, "_collective_all_reduce_multi_worker", where)
    return bool(check(strategy))
