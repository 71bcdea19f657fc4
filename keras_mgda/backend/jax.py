"""The multi-task train step on JAX: stateless and jitted.

The encoder and the heads each run once inside a `StatelessScope`; their
`jax.vjp`s give the per-task gradients with respect to Z (`vmap` over
one-hot cotangents, heads only) and then one encoder backward with the
cotangent sum_t w_t dL_t/dZ. Non-trainable state (BatchNorm statistics,
dropout seeds) flows from the encoder call into the heads call.

Under `keras.distribution.DataParallel` the step is jitted over global
arrays, so the Gram matrix is already the global one: no `psum` is needed.

A non-finite step never changes the state (it is selected away inside the
jitted step). With `on_nonfinite="raise"` the wrapped train function then
puts the unchanged state back on the model's variables (Keras's JAX `fit`
keeps them detached during an epoch) and raises, naming the task.
"""

import jax
import jax.numpy as jnp
import keras
from keras import ops

from keras_mgda import step


def _scoped(mapping, fn):
    """Runs fn() with the variables mapped to the given values; returns its
    output and the scope (to read updated values back)."""
    with keras.StatelessScope(state_mapping=mapping) as scope:
        out = fn()
    return out, scope


def _updated(scope, variables, values):
    new = []
    for v, old in zip(variables, values):
        current = scope.get_current_value(v)
        new.append(old if current is None else current)
    return new


def _select(ok, new, old):
    return [jnp.where(ok, n, o) for n, o in zip(new, old)]


def _run_weighting(model, trainable_values, ntv, task_losses, gram, loss_scale):
    """Calls the weighting on the current values of its variables.

    Returns the non-trainable values after its state updates, the (stopped)
    weights, and the gradients of its own loss with respect to every
    trainable variable (None when it has no loss)."""
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    weighting = model.weighting
    losses = jax.lax.stop_gradient(task_losses.astype("float32"))
    gram = jax.lax.stop_gradient(gram)

    def fn(tv):
        mapping = list(zip(trainable, tv)) + list(zip(non_trainable, ntv))

        def run():
            return weighting(losses, gram), weighting.loss(losses, gram)

        (weights, weighting_loss), scope = _scoped(mapping, run)
        new_ntv = _updated(scope, non_trainable, ntv)
        has_loss.append(weighting_loss is not None)
        if weighting_loss is None:
            weighting_loss = jnp.zeros((), "float32")
        scaled = weighting_loss * loss_scale.astype(weighting_loss.dtype)
        return scaled, (weights, new_ntv)

    has_loss = []
    if not weighting.trainable_variables:
        _, (weights, new_ntv) = fn(trainable_values)
        return new_ntv, jax.lax.stop_gradient(weights), None
    (_, (weights, new_ntv)), grads = jax.value_and_grad(fn, has_aux=True)(
        trainable_values
    )
    return new_ntv, jax.lax.stop_gradient(weights), grads if has_loss[0] else None


def train_step(model, state, data):
    trainable_values, non_trainable_values, optimizer_values, metrics_values = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    model._ensure_tasks(data)
    optimizer = model.optimizer
    weighting = model.weighting
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    metrics = model.metrics_variables
    needs_gram = weighting.requires_gram
    num_tasks = len(model.task_names)

    optimizer_mapping = list(zip(optimizer.variables, optimizer_values))
    with keras.StatelessScope(state_mapping=optimizer_mapping):
        loss_scale = ops.convert_to_tensor(optimizer.scale_loss(1.0), "float32")

    def encoder_fn(tv):
        mapping = list(zip(trainable, tv)) + list(zip(non_trainable, non_trainable_values))
        z, scope = _scoped(mapping, lambda: model.encoder(x, training=True))
        return z, _updated(scope, non_trainable, non_trainable_values)

    def heads_fn(z, tv, ntv):
        mapping = (
            list(zip(trainable, tv))
            + list(zip(non_trainable, ntv))
            + list(zip(metrics, metrics_values))
        )

        def run():
            y_pred = model.heads(z, training=True)
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            task_losses = model._task_losses()
            extra = model._additional_loss()
            if extra is None:
                extra = jnp.zeros((), task_losses.dtype)
            return y_pred, loss, task_losses, extra

        (y_pred, loss, task_losses, extra), scope = _scoped(mapping, run)
        new_ntv = _updated(scope, non_trainable, ntv)
        new_metrics = _updated(scope, metrics, metrics_values)
        return (task_losses, extra), (y_pred, loss, new_ntv, new_metrics)

    z, encoder_vjp, ntv = jax.vjp(encoder_fn, trainable_values, has_aux=True)

    if needs_gram:
        # Each output's head gets its own vjp, so that a task's backward
        # runs its own head only (a vjp of all heads at once would run every
        # head's backward for every task: T^2 head backwards).
        # Heads that share a layer form one group and run once together
        # (running the shared layer per output would update its state once
        # per output); a task's backward then runs its whole group.
        ys = [None] * len(keras.tree.flatten(model._outputs_struct))
        group_outputs, head_vjps, head_indices, place = [], [], [], {}
        position = {id(v): i for i, v in enumerate(trainable)}
        for group, (outputs, head) in enumerate(model._head_groups()):
            # Differentiate with respect to this head's own weights only: the
            # others would come back as zeros to add, T times over.
            indices = [position[id(v)] for v in head.trainable_variables]
            own = [trainable[i] for i in indices]

            own_set = set(indices)
            others = [
                (v, value)
                for i, (v, value) in enumerate(zip(trainable, trainable_values))
                if i not in own_set
            ]

            def head_fn(z, own_values, head=head, own=own, ntv=ntv, others=others, single=len(outputs) == 1):
                mapping = (
                    list(zip(own, own_values)) + others + list(zip(non_trainable, ntv))
                )
                y_out, scope = _scoped(mapping, lambda: head(z, training=True))
                return ([y_out] if single else list(y_out)), _updated(scope, non_trainable, ntv)

            own_values = [trainable_values[i] for i in indices]
            y_group, head_vjp, ntv = jax.vjp(head_fn, z, own_values, has_aux=True)
            for slot, output in enumerate(outputs):
                ys[output] = y_group[slot]
                place[output] = (group, slot)
            group_outputs.append(y_group)
            head_vjps.append(head_vjp)
            head_indices.append(indices)

        def loss_fn(ys, tv):
            y_pred = keras.tree.pack_sequence_as(model._outputs_struct, ys)
            mapping = (
                list(zip(trainable, tv))
                + list(zip(non_trainable, ntv))
                + list(zip(metrics, metrics_values))
            )

            def run():
                loss = model._compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
                extra = model._additional_loss()
                if extra is None:
                    extra = jnp.zeros((), loss.dtype)
                return loss, model._task_losses(), extra

            (loss, task_losses, extra), scope = _scoped(mapping, run)
            aux = (y_pred, loss, _updated(scope, non_trainable, ntv), _updated(scope, metrics, metrics_values))
            return (task_losses, extra), aux

        (task_losses, extra), loss_vjp, aux = jax.vjp(loss_fn, ys, trainable_values, has_aux=True)
        scale = loss_scale.astype(task_losses.dtype)
        zero_extra = jnp.zeros_like(extra)
        output_indices = model._task_output_indices()
        if len(set(output_indices)) == len(output_indices):
            # Each output feeds one task: one vjp of the summed losses gives
            # every dL_t/dy_t (a vmap over one-hot cotangents would compute
            # all T x T blocks, T - 1 of every T of them zeros).
            summed = jnp.full((num_tasks,), scale, dtype=task_losses.dtype)
            per_output = loss_vjp((summed, zero_extra))[0]
            task_cotangents = [per_output[i] for i in output_indices]
        else:
            one_hot = jnp.eye(num_tasks, dtype=task_losses.dtype) * scale
            # dL_t/dy for every task at once: the losses are cheap
            # elementwise functions of the outputs.
            stacked = jax.vmap(lambda c: loss_vjp((c, zero_extra))[0])(one_hot)
            task_cotangents = [stacked[i][t] for t, i in enumerate(output_indices)]
        jac_z, jac_params = [], []
        for t, output_index in enumerate(output_indices):
            group, slot = place[output_index]
            cotangent = [jnp.zeros_like(y) for y in group_outputs[group]]
            cotangent[slot] = task_cotangents[t]
            dz, dparams = head_vjps[group](cotangent)
            jac_z.append(dz)
            jac_params.append((head_indices[group], dparams))
        per_task_z = jnp.stack(jac_z)
        if weighting.gradient_space == "parameters":
            jacobians = jax.vmap(lambda g: encoder_vjp(g)[0])(per_task_z)
        else:
            jacobians = [per_task_z]
        gram = step.gram_from_jacobians(jacobians, loss_scale)
        ntv, weights, weighting_grads = _run_weighting(
            model, trainable_values, aux[2], task_losses, gram, loss_scale
        )
        head_weights = weighting.head_weights(weights).astype(task_losses.dtype)
        (grads,) = encoder_vjp(step.combine(weights, per_task_z))
        _, extra_grads = loss_vjp((jnp.zeros_like(task_losses), scale))
        grads = [g + e for g, e in zip(grads, extra_grads)]
        grads = list(grads)
        for t, (indices, dparams) in enumerate(jac_params):
            for i, d in zip(indices, dparams):
                grads[i] = grads[i] + (head_weights[t] * d).astype(grads[i].dtype)
        if weighting_grads is not None:
            grads = [g + w.astype(g.dtype) for g, w in zip(grads, weighting_grads)]
        y_pred, loss, _, metrics_after_loss = aux
        aux = (y_pred, loss, ntv, metrics_after_loss)
    else:
        gram = None

        def objective(tv):
            z_local, ntv_local = encoder_fn(tv)
            (task_losses, extra), aux = heads_fn(z_local, tv, ntv_local)
            y_pred, loss, ntv_local, metrics_local = aux
            constants = jax.lax.stop_gradient(task_losses.astype("float32"))
            mapping = list(zip(trainable, tv)) + list(zip(non_trainable, ntv_local))

            def run():
                return weighting(constants), weighting.loss(constants, None)

            (weights, weighting_loss), scope = _scoped(mapping, run)
            ntv_local = _updated(scope, non_trainable, ntv_local)
            weights = jax.lax.stop_gradient(weights)
            total = ops.sum(weights.astype(task_losses.dtype) * task_losses) + extra
            if weighting_loss is not None:
                total = total + weighting_loss.astype(total.dtype)
            total = total * loss_scale.astype(total.dtype)
            return total, (task_losses, weights, (y_pred, loss, ntv_local, metrics_local))

        (_, (task_losses, weights, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
            trainable_values
        )
    y_pred, loss, ntv, metrics_after_loss = aux

    per_task_ok, logged_ok, step_ok = step.step_flags(optimizer, task_losses, gram, weights)
    raising = model.on_nonfinite == "raise"
    if raising:
        # After a non-finite step, the rest of a multi-step execution
        # (steps_per_execution > 1) changes nothing either: the wrapped
        # train function raises with the state from before that step.
        flag_index = _nonfinite_flag_index(model)
        step_ok = jnp.logical_and(step_ok, metrics_values[flag_index] == 0)

    new_trainable, new_optimizer = optimizer.stateless_apply(optimizer_values, grads, trainable_values)
    new_trainable = _select(step_ok, new_trainable, trainable_values)
    new_optimizer = _select(step_ok, new_optimizer, optimizer_values)
    new_non_trainable = _select(step_ok, ntv, non_trainable_values)

    # Metrics: Keras's loss tracker, compiled metrics, task weights.
    mapping = list(zip(metrics, metrics_after_loss))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        model._loss_tracker.update_state(loss, sample_weight=step.batch_size(x))
        model._update_task_trackers(weights, logged_ok)
        model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if raising:
            bad_task = jnp.argmin(per_task_ok.astype("int32"))
            model._parts.nonfinite_tracker.update_state(step_ok, bad_task)
    updated_metrics = _updated(scope, metrics, metrics_after_loss)
    record_ids = step.step_record_ids(model)
    kept_metrics = [
        new if id(v) in record_ids else jnp.where(step_ok, new, old)
        for v, new, old in zip(metrics, updated_metrics, metrics_values)
    ]
    with keras.StatelessScope(state_mapping=list(zip(metrics, kept_metrics))) as scope:
        logs = model._train_logs(step_ok)
    new_metrics = _updated(scope, metrics, kept_metrics)
    return logs, (new_trainable, new_non_trainable, new_optimizer, new_metrics)


def _nonfinite_flag_index(model):
    """Where `_FirstNonfiniteTask`'s variable sits in the metrics state."""
    (flag,) = model._parts.nonfinite_tracker.variables
    for index, v in enumerate(model.metrics_variables):
        if v is flag:
            return index
    raise RuntimeError("keras_mgda: the non-finite flag is not a metric variable.")


def wrap_train_function(model, train_function):
    """Raises after a non-finite step, once the unchanged state is back on
    the model's variables (with `on_nonfinite="raise"`)."""
    if model.on_nonfinite != "raise":
        return train_function

    def checked(state, data):
        if model._parts.nonfinite_tracker is None:
            # No tasks yet: the step raises the error that says why.
            return train_function(state, data)
        flag_index = _nonfinite_flag_index(model)
        trainable, non_trainable, optimizer_values, metrics_values = state
        metrics_values = list(metrics_values)
        metrics_values[flag_index] = jnp.zeros_like(metrics_values[flag_index])
        state = (trainable, non_trainable, optimizer_values, metrics_values)
        logs, new_state = train_function(state, data)
        # One scalar read per call: waits for the step, as Keras's own
        # logging does whenever a callback reads the logs.
        bad = int(new_state[3][flag_index]) - 1
        if bad >= 0:
            trainable, non_trainable, optimizer_values, metrics_values = new_state
            model._jax_state = {
                "trainable_variables": trainable,
                "non_trainable_variables": non_trainable,
                "optimizer_variables": optimizer_values,
                "metrics_variables": metrics_values,
            }
            model._jax_state_synced = False
            model.jax_state_sync()
            raise FloatingPointError(f"{model.nonfinite_message()} {model.task_names[bad]}")
        return logs, new_state

    return checked
