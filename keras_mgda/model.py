"""MultiTaskModel and MGDAModel: a functional `keras.Model` whose `fit`
balances the task losses with a `Weighting` (MGDA-UB by default)."""

import inspect

import keras

from keras_mgda import backend as mtl_backend
from keras_mgda import graph
from keras_mgda import weighting as weighting_lib

NONFINITE_POLICIES = ("raise", "skip")


class _RecordingLoss:
    """Wraps one entry of Keras's `CompileLoss` to keep the value it computed,
    so the per-task losses come with Keras's own structure handling,
    `sample_weight`, `loss_weights` and `<output>_loss` trackers."""

    def __init__(self, loss_fn, sink, index):
        self.loss_fn = loss_fn
        self.sink = sink
        self.index = index

    def __call__(self, y_true, y_pred, sample_weight=None):
        value = self.loss_fn(y_true, y_pred, sample_weight)
        self.sink[self.index] = value
        return value

    def __getattr__(self, name):
        return getattr(self.loss_fn, name)


class _TaskWeightsMean(keras.metrics.Metric):
    """The mean of each task's weight over the steps whose weights are
    finite, logged as `<task>_alpha`. One (T,) sum instead of T `Mean`
    metrics: a step then updates two variables whatever the number of
    tasks (T metrics cost about 5 ms per step with 40 tasks in eager
    torch)."""

    def __init__(self, task_names):
        super().__init__(name="task_weights", dtype="float32")
        self.task_names = list(task_names)
        self.total = self.add_variable(
            shape=(len(self.task_names),),
            initializer="zeros",
            dtype=self.dtype,
            aggregation="sum",
            name="total",
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, aggregation="sum", name="count"
        )

    def update_state(self, weights, finite):
        if isinstance(finite, bool):  # eager steps decide on the host
            if finite:
                self.total.assign_add(keras.ops.cast(weights, self.dtype))
                self.count.assign_add(1.0)
            return
        weights = keras.ops.cast(weights, self.dtype)
        self.total.assign_add(
            keras.ops.where(finite, weights, keras.ops.zeros_like(weights))
        )
        self.count.assign_add(keras.ops.cast(finite, self.dtype))

    def result_names(self):
        return [f"{name}_alpha" for name in self.task_names]

    def result(self):
        means = keras.ops.divide_no_nan(self.total, self.count)
        values = keras.ops.unstack(means, num=len(self.task_names))
        return dict(zip(self.result_names(), values))


class _FirstNonfiniteTask(keras.metrics.Metric):
    """Remembers the first task whose loss or gradient was not finite since
    the last reset (its index + 1; 0 when none), for a jitted step to report
    with `on_nonfinite="raise"` through its state: a host callback from
    inside the step costs more than the step's whole weighting. Logs
    nothing."""

    def __init__(self):
        super().__init__(name="first_nonfinite_task", dtype="float32")
        self.task_plus_one = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="task_plus_one"
        )

    def update_state(self, step_ok, bad_task):
        current = self.task_plus_one.value
        first = keras.ops.logical_and(current == 0, keras.ops.logical_not(step_ok))
        self.task_plus_one.assign(
            keras.ops.where(first, keras.ops.cast(bad_task, self.dtype) + 1, current)
        )

    def result(self):
        return {}


class _Parts:
    """Helper sub-models and per-compile state, kept out of Keras tracking so
    that `.keras` files hold exactly the user's model."""

    def __init__(self, encoder, heads, shared_tensor):
        self.encoder = encoder
        self.heads = heads
        self.shared_tensor = shared_tensor
        self.task_names = None
        self.task_weights = None  # loss_weights, one per task
        self.recorded = {}
        self.alpha_tracker = None
        self.skipped_tracker = None
        self.nonfinite_tracker = None
        self.compile_loss = None
        self.logging_task_weights = False
        self._nonfinite_flag = None

    def nonfinite_flag(self):
        """An int variable a compiled step sets to the index of a task whose
        loss or gradient was not finite (-1 when all were)."""
        if self._nonfinite_flag is None:
            self._nonfinite_flag = keras.Variable(
                -1, dtype="int32", trainable=False, name="nonfinite_task"
            )
        return self._nonfinite_flag


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

    Args:
        inputs, outputs: as for `keras.Model`.
        weighting: a `keras_mgda.weighting.Weighting`; default
            `keras_mgda.weighting.MGDA()`.
        shared: None to find the shared representation automatically, or the
            name of the layer whose output is Z.
        on_nonfinite: what a training step does when a task's loss or
            gradient is NaN or Inf: `"raise"` (default) stops `fit` with an
            error naming the task, before any weight changes; `"skip"`
            leaves every weight and optimizer state unchanged for that step
            and counts it in the `skipped_steps` log.
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
        *args,
        weighting=None,
        shared=None,
        on_nonfinite="raise",
        **kwargs,
    ):
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
        shared_tensor = graph.resolve_shared(self, shared)
        encoder, heads = graph.split_at(self, shared_tensor)
        object.__setattr__(self, "_parts", _Parts(encoder, heads, shared_tensor))
        object.__setattr__(self, "_shared_name", _layer_name(shared, shared_tensor))

    @property
    def weighting(self):
        """The `Weighting` that balances the tasks."""
        return self._weighting

    @property
    def encoder(self):
        """The functional sub-model from the inputs to the shared
        representation Z (shares the layers and weights)."""
        return self._parts.encoder

    @property
    def heads(self):
        """The functional sub-model from Z to the outputs."""
        return self._parts.heads

    @property
    def task_names(self):
        """Names of the outputs compiled with a loss (known once built)."""
        return self._parts.task_names

    @property
    def metrics(self):
        metrics = super().metrics
        if self._tasks_ready():
            parts = self._parts
            metrics = metrics + self._task_trackers()
        return metrics

    def get_metrics_result(self):
        results = super().get_metrics_result()
        if self._tasks_ready() and not self._parts.logging_task_weights:
            # Task weights exist only in training: keep them out of
            # `evaluate` and the `val_` logs.
            for key in self._parts.alpha_tracker.result_names():
                results.pop(key, None)
            results.pop(self._parts.skipped_tracker.name, None)
        return results

    def _tasks_ready(self):
        parts = self.__dict__.get("_parts")
        return (
            parts is not None
            and parts.task_names is not None
            and parts.compile_loss is getattr(self, "_compile_loss", None)
        )

    def _task_trackers(self):
        parts = self._parts
        return [parts.alpha_tracker, parts.skipped_tracker, parts.nonfinite_tracker]

    def _train_logs(self, step_taken):
        """Counts a skipped step and returns the logs of the train step:
        Keras's metrics plus the task weights."""
        if isinstance(step_taken, bool):
            # Eager steps decide on the host: adding 0 is not worth an op.
            if not step_taken:
                self._parts.skipped_tracker.update_state(1.0)
        else:
            self._parts.skipped_tracker.update_state(
                1.0 - keras.ops.cast(step_taken, "float32")
            )
        self._parts.logging_task_weights = True
        try:
            return self.get_metrics_result()
        finally:
            self._parts.logging_task_weights = False

    # Task bookkeeping -----------------------------------------------------

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
        finally:
            if defer:
                optimizer.built = False
        if self._compile_loss is not None and self._compile_loss.built:
            self._prepare_tasks()
        if defer:
            optimizer.build(self.trainable_variables)

    def _ensure_tasks(self, data):
        """Makes sure the tasks are known and their trackers exist; on TF
        without a distribution strategy Keras builds lazily, so build here."""
        if not self._tasks_ready():
            if self._compile_loss is None:
                raise ValueError(
                    "The model was compiled without a loss, so it has no "
                    "task. Pass `loss=` to `compile`, one per output that is "
                    "a task, e.g. loss={'left': 'sparse_categorical_"
                    "crossentropy', 'right': ...}."
                )
            if not self._compile_loss.built:
                self._symbolic_build(data_batch=data)
            self._prepare_tasks()

    def _prepare_tasks(self):
        parts = self._parts
        compile_loss = self._compile_loss
        if parts.task_names is not None and parts.compile_loss is compile_loss:
            return
        flat_losses = getattr(compile_loss, "_flat_losses", None)
        if flat_losses is None:
            raise RuntimeError(
                "keras_mgda reads the per-output losses from Keras's "
                "CompileLoss._flat_losses, which this Keras version "
                f"({keras.__version__}) does not have. Install keras>=3.10."
            )
        if not flat_losses:
            raise ValueError(
                "No output of the model has a loss, so there is no task. "
                "Pass `loss=` to `compile` for the outputs that are tasks."
            )
        parts.recorded = {}
        for index, entry in enumerate(flat_losses):
            if not isinstance(entry.loss, _RecordingLoss):
                flat_losses[index] = entry._replace(
                    loss=_RecordingLoss(entry.loss, parts.recorded, index)
                )
            else:
                entry.loss.sink = parts.recorded
        parts.task_names = [entry.name for entry in flat_losses]
        parts.task_weights = [
            1.0 if entry.loss_weights is None else entry.loss_weights
            for entry in flat_losses
        ]
        parts.alpha_tracker = _TaskWeightsMean(parts.task_names)
        parts.skipped_tracker = keras.metrics.Sum(name="skipped_steps")
        parts.nonfinite_tracker = _FirstNonfiniteTask()
        parts.compile_loss = compile_loss
        self._build_weighting(len(parts.task_names))

    def _build_weighting(self, num_tasks):
        weighting = self.weighting
        if not weighting.built:
            weighting.build(num_tasks, self._parts.task_names)
        elif weighting.num_tasks != num_tasks:
            raise ValueError(
                f"The weighting {weighting!r} was built for "
                f"{weighting.num_tasks} tasks, but the model is compiled "
                f"with {num_tasks} tasks ({self._parts.task_names}). Give "
                "the model a new weighting instance, or compile it with the "
                "losses it was built with."
            )

    def _output_heads(self):
        """One functional sub-model from Z to each output, in the flat order
        of the outputs (for backends whose autodiff does not prune)."""
        parts = self._parts
        if getattr(parts, "output_heads", None) is None:
            parts.output_heads = [
                keras.Model(parts.shared_tensor, output)
                for output in keras.tree.flatten(self._outputs_struct)
            ]
        return parts.output_heads

    def _head_groups(self):
        """The outputs grouped so that no two groups' heads share a layer or
        a variable: a list of `(output_indices, head)`, where `head` is a
        functional model from Z to those outputs (one output: the model of
        `_output_heads()`, returning a tensor; several: a model returning a
        list, in the order of `output_indices`). Usually every output is
        its own group; heads that share a layer must run once together, or
        the shared layer would update its state (BatchNorm statistics,
        dropout seeds) once per output."""
        parts = self._parts
        if getattr(parts, "head_groups", None) is None:
            heads = self._output_heads()
            owners = [
                {id(l) for l in head.layers if not isinstance(l, keras.layers.InputLayer)}
                | {id(v) for v in head.variables}
                for head in heads
            ]
            group = list(range(len(heads)))

            def root(i):
                while group[i] != i:
                    i = group[i]
                return i

            for i in range(len(heads)):
                for j in range(i):
                    if owners[i] & owners[j]:
                        group[root(i)] = root(j)
            members = {}
            for i in range(len(heads)):
                members.setdefault(root(i), []).append(i)
            outputs = keras.tree.flatten(self._outputs_struct)
            parts.head_groups = [
                (
                    indices,
                    heads[indices[0]]
                    if len(indices) == 1
                    else keras.Model(parts.shared_tensor, [outputs[i] for i in indices]),
                )
                for indices in members.values()
            ]
        return parts.head_groups

    def _task_output_indices(self):
        """For each task, the flat index of the output its loss reads."""
        outputs = keras.tree.flatten(self._outputs_struct)
        indices = keras.tree.pack_sequence_as(self._outputs_struct, list(range(len(outputs))))
        result = []
        for entry in self._compile_loss._flat_losses:
            index = indices
            try:
                for key in entry.path:
                    index = index[key]
            except (KeyError, IndexError, TypeError):
                index = self.output_names.index(entry.path[-1])
            if not isinstance(index, int):
                index = 0
            result.append(index)
        return result

    def _task_loss_list(self):
        """The per-task losses recorded by the last loss computation, with
        their `loss_weights`: a list of T scalars in the loss dtype, each
        depending on its own output only (so a backward from one reaches
        one head)."""
        parts = self._parts
        dtype = self._compile_loss.dtype
        return [
            keras.ops.cast(parts.recorded[index], dtype)
            if isinstance(weight, (int, float)) and weight == 1
            else keras.ops.cast(parts.recorded[index], dtype) * weight
            for index, weight in enumerate(parts.task_weights)
        ]

    def _task_losses(self):
        """`_task_loss_list()` stacked into one (T,) tensor."""
        return keras.ops.stack(self._task_loss_list())

    def _additional_loss(self):
        """Regularisation and `add_loss` terms, applied unweighted."""
        extra = [self._aggregate_additional_loss(loss) for loss in self.losses]
        if not extra:
            return None
        return keras.ops.sum(keras.ops.stack(extra))

    def _update_task_trackers(self, weights, finite):
        """Logs each task's weight, ignoring steps whose weights are not
        finite."""
        self._parts.alpha_tracker.update_state(weights, finite)

    def nonfinite_message(self):
        return (
            "keras_mgda: the loss or gradient of a task is NaN or Inf at this "
            "step; no weight was changed. Lower the learning rate, check the "
            "data and the loss of that task, or compile with "
            "on_nonfinite='skip' to skip such steps. Task:"
        )

    def _update_metrics(self, x, y, y_pred, sample_weight):
        """Updates the compiled metrics. Keras's `compute_metrics` also
        computes every metric's result, which eager torch pays for (about
        20 ms per step with 40 tasks) and the train step then recomputes;
        a subclass that overrides `compute_metrics` still gets it called."""
        if type(self).compute_metrics is not keras.Model.compute_metrics:
            self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        elif self._compile_metrics is not None:
            self._compile_metrics.update_state(y, y_pred, sample_weight)

    def _weighting_variable_ids(self):
        return {id(v) for v in self.weighting.variables}

    # Training -------------------------------------------------------------

    def fit(self, *args, **kwargs):
        if self.weighting.has_epoch_hook:
            arguments = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
            arguments.arguments.pop("self")
            callbacks = list(arguments.arguments.get("callbacks") or [])
            callbacks.append(_WeightingEpochHook())
            arguments.arguments["callbacks"] = callbacks
            return super().fit(*arguments.args, **arguments.kwargs)
        return super().fit(*args, **kwargs)

    def train_step(self, *args, **kwargs):
        return mtl_backend.train_step(self, *args, **kwargs)

    def make_train_function(self, force=False):
        previous = self.train_function
        super().make_train_function(force=force)
        if self.train_function is not previous:
            self.train_function = mtl_backend.wrap_train_function(
                self, self.train_function
            )

    def get_config(self):
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

    def on_epoch_end(self, epoch, logs=None):
        self.model.weighting.on_epoch_end(epoch, logs)


def _layer_name(shared, shared_tensor):
    """A serialisable name for the shared representation, or None when it is
    found automatically (it will be found again on load)."""
    if shared is None:
        return None
    if isinstance(shared, str):
        return shared
    operation = shared_tensor._keras_history[0]
    return operation.name


@keras.saving.register_keras_serializable(package="keras_mgda")
class MGDAModel(MultiTaskModel):
    """A `MultiTaskModel` trained with MGDA-UB (Sener & Koltun, 2018).

    Args:
        inputs, outputs: as for `keras.Model`.
        normalization, mode, head_update, max_iters, tol, epsilon: options of
            `keras_mgda.weighting.MGDA`.
        shared, on_nonfinite: as for `MultiTaskModel`.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    model = keras_mgda.MGDAModel(inputs, {"left": left, "right": right})
    model.compile("sgd", loss="sparse_categorical_crossentropy")
    model.fit(images, {"left": y_left, "right": y_right}, epochs=10)
    ```
    """

    _MGDA_OPTIONS = ("normalization", "mode", "head_update", "max_iters", "tol", "epsilon")

    def __init__(self, *args, weighting=None, **kwargs):
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
