"""The multi-task train step on TensorFlow (tf.GradientTape, tf.distribute)."""

import keras
import tensorflow as tf
from keras import ops

from keras_mgda import step


def _unscale_for_distribution(value):
    # Keras pre-scales each replica's loss by 1/R; the logged loss is not.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value * replicas if replicas > 1 else value


def _all_reduce_sum(value):
    """Sums `value` over replicas so each one solves the same global problem."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


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

    tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(ok, grads)
    )


def _restore_unless(ok, variables, saved):
    """`step.restore_unless`, with the restore in a branch taken only when
    the step is bad: a graph then runs 2 ops per protected variable less on
    every good step (about 170 with 40 tasks, whose loss trackers are all
    protected). Under a distribution strategy, assigning mirrored
    variables inside a branch would need a merge call: select instead."""
    if not variables:
        return
    if tf.distribute.has_strategy():
        step.restore_unless(ok, variables, saved)
        return

    def restore():
        for v, old in zip(variables, saved):
            v.assign(old)

    ops.cond(ok, lambda: None, restore)


def _weighting_loss(weighting, global_losses, gram):
    """The weighting's own objective, scaled like a replica's loss (Keras
    sums the replicas' gradients)."""
    value = weighting.loss(global_losses, gram)
    if value is None:
        return None
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value / replicas if replicas > 1 else value


def train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    model._ensure_tasks(data)
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    weighting = model.weighting
    encoder, heads = model.encoder, model.heads
    trainable = model.trainable_variables
    needs_gram = weighting.requires_gram
    in_parameters = needs_gram and weighting.gradient_space == "parameters"
    protected = step.state_to_protect(model)
    saved = step.snapshot(protected)

    with tf.GradientTape(persistent=needs_gram) as tape:
        z = encoder(x, training=True)
        y_pred = heads(z, training=True)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            _unscale_for_distribution(loss), sample_weight=step.batch_size(x)
        )
        task_loss_list = model._task_loss_list()
        task_losses = ops.stack(task_loss_list)
        extra = model._additional_loss()
        scaled_extra = None if extra is None else optimizer.scale_loss(extra)
        if needs_gram:
            scaled_list = [optimizer.scale_loss(l) for l in task_loss_list]
        else:
            # Each replica's losses are its local means pre-scaled by 1/R, so
            # their sum is the global mean: every replica weighs the same.
            global_losses = tf.stop_gradient(
                _all_reduce_sum(ops.cast(task_losses, "float32"))
            )
            weights = tf.stop_gradient(weighting(global_losses))
            objective = ops.sum(
                ops.cast(weights, task_losses.dtype)
                * optimizer.scale_loss(task_losses)
            )
            weighting_loss = _weighting_loss(weighting, global_losses, None)
            if weighting_loss is not None:
                objective = objective + optimizer.scale_loss(
                    ops.cast(weighting_loss, objective.dtype)
                )
            if scaled_extra is not None:
                objective = objective + scaled_extra

    gram = None
    if needs_gram:
        loss_scale = optimizer.scale_loss(tf.ones((), dtype="float32"))
        encoder_vars = encoder.trainable_variables
        encoder_ids = {id(v) for v in encoder_vars}
        weighting_vars = weighting.trainable_variables
        other_ids = encoder_ids | {id(v) for v in weighting_vars}
        head_vars = [v for v in trainable if id(v) not in other_ids]
        # One backward per task through its own head only: TF prunes the
        # backward to the ops between the sources and that task's loss (a
        # stacked target, or pfor over one, would run every head's backward
        # for every task: T^2 head backwards).
        jac_z, jac_heads = [], []
        for scaled in scaled_list:
            grads_t = tape.gradient(scaled, [z] + head_vars)
            jac_z.append(grads_t[0])
            jac_heads.append(grads_t[1:])
        jac_z = tf.stack(jac_z)
        if in_parameters:
            per_task = [
                tape.gradient(z, encoder_vars, output_gradients=g_t)
                for g_t in tf.unstack(jac_z)
            ]
            # The global gradient of a shared weight is the sum of the
            # replicas' (pre-scaled) gradients: reduce before the products.
            jacobians = [
                _all_reduce_sum(tf.stack(per_var))
                for per_var in zip(*per_task)
                if per_var[0] is not None
            ]
            gram = step.gram_from_jacobians(jacobians, loss_scale)
        else:
            # Replicas hold disjoint slices of Z: the Gram matrix adds up.
            gram = _all_reduce_sum(step.gram_from_jacobians([jac_z], loss_scale))
        # Each replica's losses are its local means pre-scaled by 1/R, so
        # their sum is the global mean: every replica weighs the same tasks.
        global_losses = _all_reduce_sum(ops.cast(task_losses, "float32"))
        weighting_loss = None
        if weighting_vars:
            with tf.GradientTape() as weighting_tape:
                weights = tf.stop_gradient(weighting(global_losses, gram))
                weighting_loss = _weighting_loss(weighting, global_losses, gram)
        else:
            # No tape around the solver: a tape over its while loops would
            # make TF keep every iteration's values for a backward pass.
            weights = tf.stop_gradient(weighting(global_losses, gram))
        head_weights = weighting.head_weights(weights)

        # The encoder's one backward, with the cotangent sum_t w_t dL_t/dZ.
        encoder_grads = tape.gradient(
            z, encoder_vars, output_gradients=step.combine(weights, jac_z)
        )
        grads_by_id = dict(zip(map(id, encoder_vars), encoder_grads))
        for index, v in enumerate(head_vars):
            parts = [
                ops.cast(head_weights[t], g[index].dtype) * g[index]
                for t, g in enumerate(jac_heads)
                if g[index] is not None
            ]
            if len(parts) > 1:  # a head layer shared by several tasks
                grads_by_id[id(v)] = ops.sum(ops.stack(parts), axis=0)
            else:
                grads_by_id[id(v)] = parts[0] if parts else None
        if weighting_loss is not None and weighting_vars:
            weighting_grads = weighting_tape.gradient(
                optimizer.scale_loss(weighting_loss), weighting_vars
            )
            grads_by_id.update(zip(map(id, weighting_vars), weighting_grads))
        grads = [grads_by_id[id(v)] for v in trainable]
        if scaled_extra is not None:
            extra_grads = tape.gradient(scaled_extra, trainable)
            grads = [
                g if e is None else (e if g is None else g + e)
                for g, e in zip(grads, extra_grads)
            ]
    else:
        grads = tape.gradient(objective, trainable)
    del tape

    per_task_ok, logged_ok, step_ok = step.step_flags(
        optimizer, task_losses, gram, weights
    )
    step_ok = _all_reduce_sum(ops.cast(ops.logical_not(step_ok), "int32")) == 0

    bad_task = ops.argmin(ops.cast(per_task_ok, "int32"))
    if model.on_nonfinite == "raise" and not model.jit_compile:
        _restore_unless(step_ok, protected, saved)
        check = tf.debugging.Assert(
            step_ok,
            [model.nonfinite_message(), tf.gather(tf.constant(model.task_names), bad_task)],
            summarize=1,
        )
        # Every op the update creates waits for the check.
        with tf.control_dependencies([check]):
            optimizer.apply_gradients(zip(grads, trainable))
    else:
        # XLA compiles neither Assert nor string ops: skip the step here and
        # let the wrapped train function raise (see wrap_train_function).
        _apply_if(step_ok, optimizer, grads, trainable)
        if model.on_nonfinite == "raise":
            model._parts.nonfinite_flag().assign(
                ops.where(step_ok, -1, ops.cast(bad_task, "int32"))
            )

    model._update_task_trackers(weights, logged_ok)
    # Only the updates: the results are computed once, in `_train_logs`.
    model._update_metrics(x, y, y_pred, sample_weight)
    _restore_unless(step_ok, protected, saved)
    return model._train_logs(step_ok)


def wrap_train_function(model, train_function):
    """Under XLA, raises after a non-finite step (whose updates were skipped
    inside the step), naming the task."""
    if model.on_nonfinite != "raise" or not model.jit_compile:
        return train_function

    def checked(iterator):
        flag = model._parts.nonfinite_flag()
        flag.assign(-1)
        logs = train_function(iterator)
        bad = int(flag.numpy())
        if bad >= 0:
            raise FloatingPointError(
                f"{model.nonfinite_message()} {model.task_names[bad]}"
            )
        return logs

    return checked
