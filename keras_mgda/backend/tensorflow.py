"""The multi-task train step on TensorFlow (tf.GradientTape, tf.distribute).

The phases of `keras_mgda.step.phases`, with TensorFlow's autodiff: one
persistent tape over the forward pass; the per-task gradients dL_t/dZ from
one backward of the summed losses when each head reads its own copy of Z
(`StepPlan.separable`), else one backward per task through its own head;
then one encoder backward with the cotangent sum_t w_t dL_t/dZ.

Replicas of `tf.distribute` sum their Gram matrices and losses, so every
replica solves the same global problem and takes the same decision.

A compiled step cannot raise: a non-finite step is skipped inside it and
recorded, and the wrapped train function raises `FloatingPointError`
after the call. An error raised while the step runs (a loss's own check,
a label out of range) can leave state the forward pass already changed:
the step first copies that state into snapshot variables, and the wrapper
puts it back before the error propagates.
"""

import collections
import contextlib

import keras
import tensorflow as tf
from keras import ops

from keras_mgda import _keras
from keras_mgda.step import diagnosis
from keras_mgda.step import phases

__all__ = [
    "build_before_tracing",
    "distributed_step_function",
    "prepare_plan",
    "train_step",
    "wrap_train_function",
]

# What the gradient phase hands to the decision and apply phases.
_Result = collections.namedtuple("_Result", ["y_pred", "losses", "task_losses", "gram", "weights", "grads"])


def _replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _all_reduce_sum(value):
    """Sums `value` over replicas so each one solves the same global problem."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _global_losses(task_losses):
    # Each replica's losses are its local means pre-scaled by 1/R, so their
    # sum is the global mean: every replica weighs the same tasks.
    return tf.stop_gradient(_all_reduce_sum(ops.cast(task_losses, "float32")))


def _weighting_objective(plan, losses, gram):
    """The weighting's own loss, scaled like a replica's loss (Keras sums
    the replicas' gradients)."""
    value = phases.weighting_loss(plan, losses, gram)
    replicas = _replicas()
    return value if value is None or replicas == 1 else value / replicas


# Building before the first trace -------------------------------------------


def build_before_tracing(model, iterator=None, data_batch=None):
    """Builds the compiled loss, the weighting, the step plan and the
    optimizer eagerly, from the batch's shapes, before `fit` traces the step.

    Without a distribution strategy Keras's TensorFlow trainer builds them
    inside the first trace, where each variable it creates gets a lifted,
    conditional initializer (about 0.03 s per optimizer slot: half of a T=40
    LeNet's first `fit`, docs/benchmarks.md). With a strategy Keras draws a
    batch and reduces it across replicas (`strategy.reduce`), eagerly: across
    workers (`MultiWorkerMirroredStrategy`) that fails on the distributed
    batch. Here the dataset's element spec serves, so no batch is drawn and
    nothing crosses workers; a spec that is not a dense tensor's (ragged,
    sparse) is left to Keras.

    Returns:
        True when built, False to leave it to Keras.
    """
    strategy = _keras.distribute_strategy(model)
    if data_batch is None:
        data_batch = _spec_batch(_keras.epoch_dataset(iterator))
    if data_batch is None:
        return strategy is None  # without a strategy: built in the first trace
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        _keras.symbolic_build(model, data_batch)
    return True


def _spec_batch(dataset):
    """The dataset's element spec as a symbolic batch (one replica's, for a
    distributed dataset), or None where a spec is not a dense tensor's."""
    specs = getattr(dataset, "element_spec", None)
    if specs is None:
        return None
    local = [_dense_spec(s) for s in tf.nest.flatten(specs)]
    if any(s is None for s in local):
        return None
    return tf.nest.pack_sequence_as(specs, local)


def _dense_spec(spec):
    """A `tf.TensorSpec`, or a distributed dataset's per-replica spec of one
    (one component per local replica, all alike), as one `tf.TensorSpec`."""
    if type(spec) is tf.TensorSpec:
        return spec
    if type(spec).__name__ != "PerReplicaSpec":
        return None
    parts = tf.nest.flatten(spec, expand_composites=True)
    if parts and all(type(p) is tf.TensorSpec and p == parts[0] for p in parts):
        return parts[0]
    return None


# Across workers -------------------------------------------------------------


def distributed_step_function(model, step_function):
    """The step function with a leading axis of length 1 on every log, under
    a multi-worker strategy.

    There Keras's trainer reduces each log with `strategy.reduce("MEAN", v,
    axis=0)` (tensorflow/tensorflow#72388), which fails on a scalar; on
    values with a leading replica axis it is the mean over all replicas, of
    each log's own shape, as Keras logs with one worker.
    """
    if not _keras.reduces_across_workers(model.distribute_strategy):
        return step_function

    def step_with_replica_axis(data):
        return tf.nest.map_structure(lambda v: tf.expand_dims(v, 0), step_function(data))

    return step_with_replica_axis


# Snapshots --------------------------------------------------------------


def prepare_plan(plan, model):
    """Makes one snapshot variable per protected variable (same shape, dtype
    and distribution), outside any traced function."""
    protected = plan.protected(model)
    with tf.init_scope():
        copies = [
            keras.Variable(
                initializer="zeros",
                shape=v.shape,
                dtype=v.dtype,
                trainable=False,
                aggregation=v.aggregation,
                synchronization=v.synchronization,
                name=f"keras_mgda_snapshot_{index}",
            )
            for index, v in enumerate(protected)
        ]
    plan.backend_state = (protected, copies)


def _save(plan, model):
    """Copies the protected state into its snapshots; returns the values."""
    protected, copies = plan.backend_state
    for v, copy in zip(protected, copies, strict=True):
        copy.assign(v.value)
    return [copy.value for copy in copies]


def _restore_unless(ok, variables, saved):
    """Puts the saved values back when the step is bad, in a branch taken
    only then (a graph runs 2 ops per protected variable less on every good
    step). Under a distribution strategy, assigning mirrored variables
    inside a branch would need a merge call: select instead."""
    if not variables:
        return
    if tf.distribute.has_strategy():
        for v, old in zip(variables, saved, strict=True):
            v.assign(ops.where(ok, v.value, old))
        return

    def restore():
        for v, old in zip(variables, saved, strict=True):
            v.assign(old)

    ops.cond(ok, lambda: None, restore)


# Gradients ------------------------------------------------------------------


def _loss_step(model, plan, batch):
    """Loss-based weightings (and one task): one backward of
    sum_t w_t L_t, as Keras's own step."""
    optimizer = model.optimizer
    trainable = model.trainable_variables
    with tf.GradientTape() as tape:
        y_pred = model(batch.x, training=True)
        losses = phases.compute_losses(model, plan, batch, y_pred)
        task_losses = ops.stack(losses.tasks)
        global_losses = _global_losses(task_losses)
        weights, _ = phases.task_weights(plan, global_losses, None)
        weights = tf.stop_gradient(weights)
        own = _weighting_objective(plan, global_losses, None)
        objective = phases.loss_objective(plan, losses, weights, own, optimizer.scale_loss)
    grads = tape.gradient(objective, trainable)
    return _Result(y_pred, losses, task_losses, None, weights, grads)


def _forward(model, plan, batch):
    """The encoder, then the heads on Z (each on its own copy of Z when the
    heads are separable), and the losses."""
    z = plan.split.encoder(batch.x, training=True)
    if plan.separable:
        copies = [tf.identity(z) for _ in plan.output_heads]
        outputs = [head(c, training=True) for head, c in zip(plan.output_heads, copies, strict=True)]
        y_pred = keras.tree.pack_sequence_as(plan.outputs_struct, outputs)
    else:
        copies = None
        y_pred = plan.split.heads(z, training=True)
    return z, copies, y_pred, phases.compute_losses(model, plan, batch, y_pred)


def _task_gradients(plan, tape, scaled, z, copies, positions, trainable):
    """dL_t/dZ stacked (T, ...) and each task's own head gradients as
    `(positions, grads)`, from the scaled task losses (their sum when the
    heads read copies of Z)."""
    if copies is not None:
        # One backward for all tasks: each copy of Z gets its head's task.
        heads = [plan.output_heads[i].trainable_variables for i in plan.task_outputs]
        flat = [v for head in heads for v in head]
        grads = tape.gradient(scaled, copies + flat)
        jac_z = tf.stack([grads[i] for i in plan.task_outputs])
        head_parts, start = [], len(copies)
        for head in heads:
            head_parts.append(([positions[id(v)] for v in head], grads[start:start + len(head)]))
            start += len(head)
        return jac_z, head_parts
    # One backward per task through its own head only: TF prunes the
    # backward to the ops between the sources and that task's loss.
    excluded = {id(v) for v in plan.split.encoder.trainable_variables}
    excluded |= {id(v) for v in plan.weighting.trainable_variables}
    head_vars = [v for v in trainable if id(v) not in excluded]
    head_positions = [positions[id(v)] for v in head_vars]
    jac_z, head_parts = [], []
    for value in scaled:
        grads = tape.gradient(value, [z] + head_vars)
        jac_z.append(grads[0])
        head_parts.append((head_positions, grads[1:]))
    return tf.stack(jac_z), head_parts


def _gram_matrix(plan, tape, z, jac_z, loss_scale):
    """The global Gram matrix of the per-task gradients, the gradients in
    the weighting's space (a list of (T, ...) tensors) and the variables
    they belong to (None: Z)."""
    if not plan.in_parameters:
        # Replicas hold disjoint slices of Z: the Gram matrix adds up.
        return _all_reduce_sum(phases.gram([jac_z], loss_scale)), [jac_z], None
    encoder_vars = plan.split.encoder.trainable_variables
    per_task = [tape.gradient(z, encoder_vars, output_gradients=g) for g in tf.unstack(jac_z)]
    # The global gradient of a shared weight is the sum of the replicas'
    # (pre-scaled) gradients: reduce before the products.
    # (Zeros for a weight no task reaches, as torch and JAX give them: an
    # aggregator's state has one entry per shared weight.)
    jacobians = [
        _all_reduce_sum(tf.stack(per_var)) if per_var[0] is not None
        else tf.zeros((len(per_task),) + tuple(v.shape), v.dtype)
        for v, per_var in zip(encoder_vars, zip(*per_task), strict=True)
    ]
    return phases.gram(jacobians, loss_scale), jacobians, encoder_vars


def _encoder_gradients(model, plan, tape, z, jac_z, spaces, losses, gram):
    """The task weights, head weights and the encoder's gradients as
    `(variables, grads)`: one backward with the cotangent sum_t w_t G_t,
    or an aggregator's direction (see `GradientAggregator`)."""
    encoder_vars = plan.split.encoder.trainable_variables

    def backward(cotangent):
        return encoder_vars, tape.gradient(z, encoder_vars, output_gradients=cotangent)

    if not plan.aggregates:
        weights, head_weights, own = _weigh(model, plan, losses, gram)
        return weights, head_weights, own, backward(phases.combine(weights, jac_z))
    jacobians, variables = spaces
    directions, weights, head_weights = phases.aggregate(plan, jacobians, losses, gram)
    if variables is None:
        return weights, head_weights, None, backward(directions[0])
    # Global directions: Keras sums the replicas' gradients, so each gives 1/R.
    return weights, head_weights, None, (variables, [d / _replicas() for d in directions])


def _gram_step(model, plan, batch):
    """Gram-matrix weightings: per-task gradients with respect to Z, the
    weights, one encoder backward."""
    optimizer = model.optimizer
    trainable = model.trainable_variables
    positions = {id(v): i for i, v in enumerate(trainable)}
    with tf.GradientTape(persistent=True) as tape:
        z, copies, y_pred, losses = _forward(model, plan, batch)
        scaled = [optimizer.scale_loss(value) for value in losses.tasks]
        if copies is not None:  # the target of the one backward, on the tape
            scaled = tf.add_n(scaled)
        scaled_extra = None if losses.extra is None else optimizer.scale_loss(losses.extra)
    task_losses = ops.stack(losses.tasks)
    jac_z, head_parts = _task_gradients(plan, tape, scaled, z, copies, positions, trainable)
    loss_scale = optimizer.scale_loss(tf.ones((), dtype="float32"))
    gram, *spaces = _gram_matrix(plan, tape, z, jac_z, loss_scale)
    global_losses = _global_losses(task_losses)
    weights, head_weights, own, (variables, encoder_grads) = _encoder_gradients(
        model, plan, tape, z, jac_z, spaces, global_losses, gram
    )
    parts = [([positions[id(v)] for v in variables], encoder_grads)]
    if own is not None:
        parts.append(own)
    if scaled_extra is not None:
        parts.append((range(len(trainable)), tape.gradient(scaled_extra, trainable)))
    del tape
    grads = phases.add_gradients(len(trainable), parts, head_parts, head_weights)
    return _Result(y_pred, losses, task_losses, gram, weights, grads)


def _weigh(model, plan, losses, gram):
    """The task weights, head weights, and the gradient of the weighting's
    own loss as `(positions, grads)` (None without one)."""
    weighting_vars = plan.weighting.trainable_variables
    if not weighting_vars:
        # No tape around the solver: a tape over its while loops would make
        # TF keep every iteration's values for a backward pass.
        weights, head_weights = phases.task_weights(plan, losses, gram)
        return tf.stop_gradient(weights), head_weights, None
    with tf.GradientTape() as tape:
        weights, head_weights = phases.task_weights(plan, losses, gram)
        own = _weighting_objective(plan, losses, gram)
    if own is None:
        return tf.stop_gradient(weights), head_weights, None
    grads = tape.gradient(model.optimizer.scale_loss(own), weighting_vars)
    positions = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return tf.stop_gradient(weights), head_weights, ([positions[id(v)] for v in weighting_vars], grads)


# Apply or skip --------------------------------------------------------------


def _apply_if(ok, optimizer, grads, variables):
    """Applies the gradients when `ok`; otherwise leaves weights and
    optimizer state untouched."""

    def apply():
        optimizer.apply_gradients(zip(grads, variables))

    strategy_needs_merge = tf.distribute.has_strategy() and not (
        tf.__internal__.distribute.strategy_supports_no_merge_call()
    )
    if not strategy_needs_merge:
        ops.cond(ok, apply, lambda: None)
        return

    # A cond whose branch calls merge_call must run in cross-replica context
    # (the same pattern as Keras's LossScaleOptimizer).
    def cross_replica(distribution, ok, grads):
        ok = distribution.experimental_local_results(ok)[0]

        def apply_each():
            distribution.extended.call_for_each_replica(
                lambda g: optimizer.apply_gradients(zip(g, variables)),
                args=(grads,),
            )

        ops.cond(ok, apply_each, lambda: None)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(ok, grads))


def _decide(model, plan, result):
    """The decision, agreed by every replica; with `on_nonfinite="raise"`,
    a step after a recorded non-finite one is never taken either."""
    decision = phases.decide(
        plan, model.optimizer, result.task_losses, result.gram, result.weights,
        phases.gradients_finite(result.grads),
    )
    step_ok = _all_reduce_sum(ops.cast(ops.logical_not(decision.step_ok), "int32")) == 0
    if plan.on_nonfinite == "raise":
        step_ok = ops.logical_and(step_ok, plan.trackers.nonfinite.task_plus_one.value == 0)
    return decision._replace(step_ok=step_ok)


def _after_update(model, plan, batch, task_losses, ok):
    """An `AfterUpdateHook` sees the batch's losses after a taken step."""

    def hook():
        new_losses = _global_losses(phases.losses_after_update(model, plan, batch))
        plan.weighting.after_update(_global_losses(task_losses), new_losses)

    ops.cond(ok, hook, lambda: None)


def train_step(model, data):
    plan, batch = phases.begin(model, data)
    saved = _save(plan, model)
    step = _gram_step if plan.needs_gram else _loss_step
    result = step(model, plan, batch)
    decision = _decide(model, plan, result)
    if plan.on_nonfinite == "raise":  # before `_after_update` records other data
        predictions = diagnosis.task_predictions(result.y_pred, plan.task_outputs)
        task, cause = diagnosis.on_bad_step(
            plan.recorded, plan.num_tasks, batch.x, predictions, decision.step_ok, decision.bad_index
        )
    _apply_if(decision.step_ok, model.optimizer, result.grads, model.trainable_variables)
    if plan.needs_losses_after_update:
        _after_update(model, plan, batch, result.task_losses, decision.step_ok)
    if plan.on_nonfinite == "raise":
        plan.trackers.nonfinite.update_state(decision.step_ok, task, cause)
    total = result.losses.total * _replicas()  # Keras pre-scales each replica's loss by 1/R
    phases.update_metrics(
        model, plan, batch, result.y_pred, total, result.weights, decision.logged_ok, result.gram
    )
    protected, _ = plan.backend_state
    _restore_unless(decision.step_ok, protected, saved)
    return phases.train_logs(model, plan, decision.step_ok)


def wrap_train_function(model, train_function):
    """Raises `FloatingPointError` after a call whose step was not finite
    (with `on_nonfinite="raise"`), and puts the protected state back when
    an error escapes the step."""

    def checked(iterator):
        try:
            logs = train_function(iterator)
        except BaseException as error:
            _restore_snapshots(model)
            plan = model.step_plan
            renamed = error if plan is None else diagnosis.task_exception(plan.task_names, error, plan.recorded, None)
            if renamed is error:
                raise
            raise renamed from error
        plan = model.step_plan
        if plan is not None and plan.on_nonfinite == "raise":
            flag, cause = plan.trackers.nonfinite.task_plus_one, plan.trackers.nonfinite.cause
            bad = int(flag.numpy())
            if bad:
                flag.assign(0.0)
                raise diagnosis.error_for(plan.task_names, bad - 1, int(cause.numpy()), plan.recorded)
        return logs

    return checked


def _restore_snapshots(model):
    plan = model.step_plan
    if plan is None or plan.backend_state is None:
        return
    protected, copies = plan.backend_state
    for v, copy in zip(protected, copies, strict=True):
        v.assign(copy.value)
