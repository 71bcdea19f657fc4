"""MultiTaskModel and MGDAModel: a functional `keras.Model` whose `fit`
balances the task losses with a `Weighting` (MGDA-UB by default)."""

import inspect
from typing import Any

import keras

from keras_mgda import _keras
from keras_mgda import backend as mtl_backend
from keras_mgda import graph
from keras_mgda import weighting as weighting_lib
from keras_mgda.step import Split
from keras_mgda.step import StepPlan
from keras_mgda.step import build_plan
from keras_mgda.step import diagnosis
from keras_mgda.types import WeightingLike

__all__ = ["MGDAModel", "MultiTaskModel", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("raise", "skip")


@keras.saving.register_keras_serializable(package="keras_mgda")
class MultiTaskModel(keras.Model):
    """A functional model trained as a multi-task problem.

    Built like `keras.Model(inputs, outputs)`. Every output compiled with a
    loss is a task. The model is split at the shared representation Z (the
    deepest tensor that every output depends on, or the output of the layer
    named by `shared`); each training step runs the encoder forward once,
    the heads forward once, computes what the weighting needs (per-task
    gradients with respect to Z through the heads only, their Gram matrix in
    float32), and backpropagates through the encoder once with the cotangent
    sum_t w_t dL_t/dZ. Every step logs `<output>_alpha`, the task's weight,
    beside Keras's `<output>_loss`.

    A model with a single task (one output, or one output compiled with a
    loss) has nothing to balance: it trains exactly as plain Keras, with
    weight 1 (`<task>_alpha` = 1).

    Args:
        *args: `inputs, outputs` (and any other positional argument), as
            for `keras.Model`.
        weighting: a `keras_mgda.weighting.Weighting`, or its name (see
            `keras_mgda.weighting.get`); default `keras_mgda.weighting.MGDA()`.
        shared: None to find the shared representation automatically, or the
            name of the layer whose output is Z.
        on_nonfinite: what a training step does when a loss, a gradient or
            the task weights are NaN or Inf: `"raise"` (default) stops `fit`
            with a `FloatingPointError` naming the task, before any weight,
            optimizer state, BatchNorm statistic, metric or weighting state
            changes; `"skip"` leaves them all unchanged for that step and
            counts it in the `skipped_steps` log. An exception raised inside
            a step (a loss's own check, a label out of range) likewise
            leaves them unchanged.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    x = keras.Input((16,))
    z = keras.layers.Dense(32, activation="relu")(x)
    a = keras.layers.Dense(1, name="a")(z)
    b = keras.layers.Dense(3, name="b")(z)
    model = keras_mgda.MultiTaskModel(
        x, {"a": a, "b": b}, weighting=keras_mgda.weighting.MGDA())
    model.compile("sgd", loss={"a": "mse", "b": "sparse_categorical_crossentropy"})
    history = model.fit(x_train, {"a": ya, "b": yb}, epochs=2)
    history.history["a_alpha"]
    ```
    """

    def __init__(
        self,
        *args: Any,
        weighting: WeightingLike = None,
        shared: str | keras.layers.Layer | keras.KerasTensor | None = None,
        on_nonfinite: str = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Unknown on_nonfinite={on_nonfinite!r}; use one of "
                f"{NONFINITE_POLICIES}."
            )
        self.on_nonfinite = on_nonfinite
        # Tracked like a sub-layer: the weighting's variables (state, learned
        # parameters) are the model's, saved and carried like any other.
        self._weighting = weighting_lib.get(weighting)
        _keras.track_sublayer(self, self._weighting)
        # Helper sub-models and the step plan stay out of Keras's tracking,
        # so that `.keras` files hold exactly the user's model.
        object.__setattr__(self, "_split", _split_model(self, shared))
        object.__setattr__(self, "_plan", None)
        object.__setattr__(self, "_shared_name", _layer_name(shared, self._split.shared_tensor))
        object.__setattr__(self, "_logging_task_weights", False)

    @property
    def weighting(self) -> weighting_lib.Weighting:
        """The `Weighting` that balances the tasks."""
        return self._weighting

    @property
    def encoder(self) -> keras.Model | None:
        """The functional sub-model from the inputs to the shared
        representation Z (shares the layers and weights); None for a model
        with one output, which trains as plain Keras."""
        return self._split.encoder

    @property
    def heads(self) -> keras.Model | None:
        """The functional sub-model from Z to the outputs (None likewise)."""
        return self._split.heads

    @property
    def task_names(self) -> list[str] | None:
        """Names of the outputs compiled with a loss (known once built)."""
        plan = self._current_plan()
        return None if plan is None else plan.task_names

    @property
    def step_plan(self) -> StepPlan | None:
        """The `StepPlan` of the current compilation, or None before the
        compiled loss is built."""
        return self._current_plan()

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        metrics = super().metrics
        plan = self._current_plan()
        if plan is not None:
            metrics = metrics + list(plan.trackers)
        return metrics

    def get_metrics_result(self) -> dict[str, Any]:
        results = super().get_metrics_result()
        plan = self._current_plan()
        if plan is not None and not self._logging_task_weights:
            # Task weights exist only in training: keep them out of
            # `evaluate` and the `val_` logs.
            for key in plan.trackers.alpha.result_names() + [mtl_backend.PACKED_RESULTS]:
                results.pop(key, None)
            results.pop(plan.trackers.skipped.name, None)
        return results

    def metrics_result_with_task_weights(self) -> dict[str, Any]:
        """`get_metrics_result()` with the task weights and skipped steps,
        as a train step returns it."""
        object.__setattr__(self, "_logging_task_weights", True)
        try:
            return self.get_metrics_result()
        finally:
            object.__setattr__(self, "_logging_task_weights", False)

    # The step plan --------------------------------------------------------

    def _current_plan(self):
        plan = self.__dict__.get("_plan")
        if plan is None or plan.compile_loss is not _keras.compile_loss(self):
            return None
        return plan

    # `_symbolic_build` and `_maybe_symbolic_build` are Keras trainer hooks
    # (listed in `_keras.INTERNALS`).
    def _symbolic_build(self, *args, **kwargs):
        # Keras builds the optimizer here from `trainable_variables`; the
        # weighting's variables exist only once the tasks are known (after
        # the compiled loss is built), so build the optimizer after them.
        optimizer = getattr(self, "optimizer", None)
        defer = optimizer is not None and not optimizer.built
        if defer:
            optimizer.built = True
        try:
            super()._symbolic_build(*args, **kwargs)
        except Exception as error:
            renamed = self._with_failing_task(error)
            if renamed is error:
                raise
            raise renamed from error
        finally:
            if defer:
                optimizer.built = False
        compile_loss = _keras.compile_loss(self)
        if compile_loss is not None and compile_loss.built:
            self._prepare_plan()
        if defer:
            optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # TensorFlow's trainer only: it defers the build to the first trace
        # unless a strategy is set (building eagerly halves the first fit),
        # and under a strategy it reduces a drawn batch across replicas,
        # which fails across workers: build from the element spec instead.
        if not mtl_backend.build_before_tracing(self, iterator, data_batch):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _make_function(self, step_function, *args, **kwargs):
        # TensorFlow's trainer reduces each step's logs across workers in a
        # way that fails on scalars (see
        # `keras_mgda.backend.tensorflow.distributed_step_function`); JAX's
        # takes `concatenate_outputs` (for predict), passed on unchanged.
        step_function = mtl_backend.distributed_step_function(self, step_function)
        return super()._make_function(step_function, *args, **kwargs)

    def step_plan_for(self, data: Any) -> StepPlan:
        """The `StepPlan`, built from `data` if Keras has not built the
        compiled loss yet (TensorFlow without a distribution strategy builds
        lazily)."""
        plan = self._current_plan()
        if plan is not None:
            return plan
        compile_loss = _keras.compile_loss(self)
        if compile_loss is None:
            raise ValueError(
                "The model was compiled without a loss, so it has no "
                "task. Pass `loss=` to `compile`, one per output that is "
                "a task, e.g. loss={'left': 'sparse_categorical_"
                "crossentropy', 'right': ...}."
            )
        if not compile_loss.built:
            _keras.symbolic_build(self, data)
        return self._prepare_plan()

    def _with_failing_task(self, error):
        """An error a task's loss or metric raised while Keras built the
        compiled loss and metrics (before the step records the losses),
        with the task named: the one whose loss or metric object the
        failing frames were running."""
        owners = self._loss_and_metric_owners()
        traceback = error.__traceback__
        while traceback is not None:
            for value in traceback.tb_frame.f_locals.values():
                if id(value) in owners:
                    what, task = owners[id(value)]
                    return diagnosis.renamed_for_task(error, task, what)
            traceback = traceback.tb_next
        return error

    def _loss_and_metric_owners(self):
        """{id of a compiled loss or metric object: ("loss" or "metric",
        the task (output) it belongs to)}."""
        compile_loss = _keras.compile_loss(self)
        entries = _keras.flat_losses(compile_loss) if compile_loss is not None and compile_loss.built else []
        owners = {id(entry.loss): ("loss", entry.name) for entry in entries}
        compile_metrics = _keras.compile_metrics(self)
        for output, metric in [] if compile_metrics is None else _keras.metrics_by_output(compile_metrics):
            owners.setdefault(id(metric), ("metric", output or metric.name))
        return owners

    def _prepare_plan(self):
        plan = self._current_plan()
        if plan is None:
            plan = build_plan(self, self._split, self.weighting, self.on_nonfinite)
            object.__setattr__(self, "_plan", plan)
            self._build_weighting(plan)
            mtl_backend.prepare_plan(plan, self)
        return plan

    def _build_weighting(self, plan):
        weighting = self.weighting
        if getattr(weighting, "needs_gradient_shapes", False):
            # State shaped like the per-task gradients (MoCo, ExcessMTL):
            # the shapes must be known when it builds (checked if built).
            weighting.set_gradient_shapes(plan.gradient_shapes)
        if not weighting.built:
            weighting.build(plan.num_tasks, plan.task_names)
        elif weighting.num_tasks != plan.num_tasks:
            raise ValueError(
                f"The weighting {weighting!r} was built for "
                f"{weighting.num_tasks} tasks, but the model is compiled "
                f"with {plan.num_tasks} tasks ({plan.task_names}). Give "
                "the model a new weighting instance, or compile it with the "
                "losses it was built with."
            )

    # Training -------------------------------------------------------------

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        if self.weighting.has_epoch_hook:
            arguments = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
            arguments.arguments.pop("self")
            callbacks = list(arguments.arguments.get("callbacks") or [])
            # First: a callback that saves at the epoch's end (BackupAndRestore,
            # ModelCheckpoint) must save the epoch rolled over (DWA's means), or
            # a run resumed from that save never rolls that epoch over.
            callbacks.insert(0, _WeightingEpochHook())
            arguments.arguments["callbacks"] = callbacks
            return super().fit(*arguments.args, **arguments.kwargs)
        return super().fit(*args, **kwargs)

    def train_step(self, *args: Any, **kwargs: Any) -> Any:
        return mtl_backend.train_step(self, *args, **kwargs)

    def make_train_function(self, force: bool = False) -> None:
        previous = self.train_function
        super().make_train_function(force=force)
        if self.train_function is not previous:
            self.train_function = mtl_backend.wrap_train_function(
                self, self.train_function
            )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "weighting": keras.saving.serialize_keras_object(self.weighting),
                "shared": self._shared_name,
                "on_nonfinite": self.on_nonfinite,
            }
        )
        return config


class _WeightingEpochHook(keras.callbacks.Callback):
    """Calls the weighting's `on_epoch_end` after each epoch of `fit`."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.weighting.on_epoch_end(epoch, logs)


def _split_model(model, shared):
    """The model's `Split` at Z: none for one output found automatically
    (one task trains as plain Keras), else the encoder and heads."""
    outputs = keras.tree.flatten(_keras.outputs_struct(model))
    if shared is None and len(outputs) == 1:
        return Split()
    shared_tensor = graph.resolve_shared(model, shared)
    encoder, heads = graph.split_at(model, shared_tensor)
    return Split(encoder=encoder, heads=heads, shared_tensor=shared_tensor)


def _layer_name(shared, shared_tensor):
    """A serialisable name for the shared representation, or None when it is
    found automatically (it will be found again on load)."""
    if shared is None:
        return None
    if isinstance(shared, str):
        return shared
    operation = _keras.keras_history(shared_tensor)[0]
    return operation.name


@keras.saving.register_keras_serializable(package="keras_mgda")
class MGDAModel(MultiTaskModel):
    """A `MultiTaskModel` trained with MGDA-UB (Sener & Koltun, 2018).

    Args:
        *args: `inputs, outputs`, as for `keras.Model`.
        weighting: None for `keras_mgda.weighting.MGDA` with the options
            below, or an `MGDA` instance.
        **kwargs: `normalization`, `mode`, `head_update`, `max_iters`,
            `tol`, `epsilon` (options of `keras_mgda.weighting.MGDA`);
            `shared`, `on_nonfinite` (as for `MultiTaskModel`); the rest
            passed to `keras.Model`.

    Example:

    ```python
    model = keras_mgda.MGDAModel(inputs, {"left": left, "right": right})
    model.compile("sgd", loss="sparse_categorical_crossentropy")
    model.fit(images, {"left": y_left, "right": y_right}, epochs=10)
    ```
    """

    _MGDA_OPTIONS = ("normalization", "mode", "head_update", "max_iters", "tol", "epsilon")

    def __init__(self, *args: Any, weighting: WeightingLike = None, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in self._MGDA_OPTIONS if k in kwargs}
        if weighting is None:
            weighting = weighting_lib.MGDA(**options)
        else:
            weighting = weighting_lib.get(weighting)
            if options or not isinstance(weighting, weighting_lib.MGDA):
                raise ValueError(
                    "MGDAModel takes MGDA options as keyword arguments "
                    f"({', '.join(self._MGDA_OPTIONS)}), not another "
                    "weighting; use MultiTaskModel(weighting=...) for other "
                    "methods."
                )
        super().__init__(*args, weighting=weighting, **kwargs)
