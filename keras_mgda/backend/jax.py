"""The multi-task train step on JAX: stateless and jitted.

The phases of `keras_mgda.step.phases`, with JAX's autodiff on the step's
state `(trainable, non_trainable, optimizer, metrics)`: the encoder runs
under `jax.vjp`; when the heads are separable (`StepPlan.separable`) each
reads its own copy of Z, so one vjp of the summed losses gives every
dL_t/dZ and every head's own gradient; otherwise the heads run in groups
with one vjp per task. Then one encoder backward with the cotangent
sum_t w_t dL_t/dZ. Non-trainable state (BatchNorm statistics, dropout
seeds) flows from the encoder call into the heads call.

Under `keras.distribution.DataParallel` the step is jitted over global
arrays, so the Gram matrix is already the global one: no `psum` is needed.

A non-finite step never changes the state (it is selected away inside the
jitted step) and is recorded; with `on_nonfinite="raise"` the wrapped
train function then puts the unchanged state back on the model's
variables (Keras's JAX `fit` keeps them detached during an epoch) and
raises. An error that escapes the step does the same with the state from
before it.
"""

import collections

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_mgda import _keras
from keras_mgda.backend import PACKED_RESULTS
from keras_mgda.step import diagnosis
from keras_mgda.step import phases

__all__ = ["named_results", "train_step", "wrap_train_function"]

State = collections.namedtuple("State", ["trainable", "non_trainable", "optimizer", "metrics"])
# What the gradient phase hands to the decision and apply phases.
_Result = collections.namedtuple(
    "_Result",
    ["y_pred", "total", "task_losses", "gram", "weights", "grads", "grads_ok", "non_trainable", "metrics"],
)


class _Scope:
    """The model's variables mapped to values for a stateless call."""

    def __init__(self, model):
        self.trainable = model.trainable_variables
        self.non_trainable = model.non_trainable_variables
        self.metrics = model.metrics_variables

    def run(self, fn, trainable, non_trainable, metrics=None):
        """Runs fn() on those values; returns its output and the updated
        non-trainable (and metrics) values."""
        mapping = list(zip(self.trainable, trainable)) + list(zip(self.non_trainable, non_trainable))
        if metrics is not None:
            mapping += list(zip(self.metrics, metrics))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            out = fn()
        new_non_trainable = _updated(scope, self.non_trainable, non_trainable)
        if metrics is None:
            return out, new_non_trainable
        return out, new_non_trainable, _updated(scope, self.metrics, metrics)


def _updated(scope, variables, values):
    new = []
    for v, old in zip(variables, values, strict=True):
        current = scope.get_current_value(v)
        new.append(old if current is None else current)
    return new


def _select(ok, new, old):
    return [jnp.where(ok, n, o) for n, o in zip(new, old, strict=True)]


def _apply_or_keep(ok, optimizer, state, gradients):
    """The optimizer's update where the step is taken, the old values where
    it is not, in one conditional: a select per variable and slot would
    add its operands to each update's kernel (0.35 s of XLA's compile at
    T=40). `gradients()` builds the gradients inside the branch, so that
    the head weights' products fuse into the update."""

    def apply():
        trainable, values = optimizer.stateless_apply(state.optimizer, gradients(), state.trainable)
        return list(trainable), list(values)

    def keep():
        return list(state.trainable), list(state.optimizer)

    return jax.lax.cond(ok, apply, keep)


def _losses_of(model, plan, batch, y_pred):
    """The losses as arrays: total, (T,) task losses, extra (0 if none)."""
    losses = phases.compute_losses(model, plan, batch, y_pred)
    task_losses = jnp.stack(losses.tasks)
    extra = jnp.zeros((), task_losses.dtype) if losses.extra is None else losses.extra
    return losses.total, task_losses, extra, losses.extra is not None


# Loss-based weightings -------------------------------------------------------


def _loss_step(model, plan, batch, state, loss_scale):
    """Loss-based weightings (and one task): one backward of
    sum_t w_t L_t, as Keras's own step."""
    scope = _Scope(model)

    def scale(value):
        return value * loss_scale.astype(value.dtype)

    def objective(trainable):
        def run():
            y_pred = model(batch.x, training=True)
            total, task_losses, extra, present = _losses_of(model, plan, batch, y_pred)
            constants = jax.lax.stop_gradient(task_losses.astype("float32"))
            weights, _ = phases.task_weights(plan, constants, None)
            weights = jax.lax.stop_gradient(weights)
            own = phases.weighting_loss(plan, constants, None)
            losses = phases.Losses(total, list(task_losses), None if not present else extra)
            value = phases.loss_objective(plan, losses, weights, own, scale)
            return value, (y_pred, total, task_losses, weights)

        (value, aux), ntv, metrics = scope.run(run, trainable, state.non_trainable, state.metrics)
        return value, (aux, ntv, metrics)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (_, ((y_pred, total, task_losses, weights), ntv, metrics)), grads = grad_fn(state.trainable)
    grads = list(grads)
    grads_ok = phases.gradients_finite(grads, fused=True)
    return _Result(y_pred, total, task_losses, None, weights, lambda: grads, grads_ok, ntv, metrics)


# Gram-matrix weightings ------------------------------------------------------


def _heads_vjp(model, plan, batch, state, z, ntv):
    """One vjp of the summed task losses with each output's head on its own
    copy of Z (separable heads): the copies' cotangents are the dL_t/dZ."""
    scope = _Scope(model)
    has_extra = []

    def heads_and_losses(copies, trainable):
        def run():
            outputs = [head(c, training=True) for head, c in zip(plan.output_heads, copies, strict=True)]
            y_pred = keras.tree.pack_sequence_as(plan.outputs_struct, outputs)
            total, task_losses, extra, present = _losses_of(model, plan, batch, y_pred)
            has_extra.append(present)
            return y_pred, total, task_losses, extra

        (y_pred, total, task_losses, extra), new_ntv, metrics = scope.run(run, trainable, ntv, state.metrics)
        return (task_losses, extra), (y_pred, total, new_ntv, metrics)

    copies = [z] * len(plan.output_heads)
    (task_losses, extra), vjp, aux = jax.vjp(heads_and_losses, copies, state.trainable, has_aux=True)
    return task_losses, extra, vjp, aux, has_extra[0]


def _separable_gradients(model, plan, batch, state, z, ntv, loss_scale):
    """dL_t/dZ (T, ...), each task's head gradients `(positions, grads)`,
    the extra loss's gradients and the heads' aux, from one backward."""
    task_losses, extra, vjp, aux, has_extra = _heads_vjp(model, plan, batch, state, z, ntv)
    scale = loss_scale.astype(task_losses.dtype)
    per_copy, head_grads = vjp((jnp.full(task_losses.shape, scale), jnp.zeros_like(extra)))
    jac_z = jnp.stack([per_copy[i] for i in plan.task_outputs])
    positions = _head_positions(model, plan)
    head_parts = [(p, [head_grads[i] for i in p]) for p in positions]
    extra_grads = vjp((jnp.zeros_like(task_losses), scale))[1] if has_extra else None
    return task_losses, jac_z, head_parts, extra_grads, aux


def _head_positions(model, plan):
    """For each task, the positions of its head's own weights in the
    trainable list (separable heads)."""
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return [
        [position[id(v)] for v in plan.output_heads[i].trainable_variables]
        for i in plan.task_outputs
    ]


def _grouped_gradients(model, plan, batch, state, z, ntv, loss_scale):
    """`_separable_gradients` for heads that share layers or outputs that
    feed several tasks: one vjp per head group, one backward per task
    through its own group."""
    groups = _group_vjps(model, plan, state, z, ntv)
    task_losses, loss_vjp, aux = _loss_vjp(model, plan, batch, state, groups)
    scale = loss_scale.astype(task_losses.dtype)
    output_cotangents = _output_cotangents(plan, loss_vjp, task_losses, scale)
    jac_z, head_parts = [], []
    for t, output in enumerate(plan.task_outputs):
        group, slot = groups.place[output]
        cotangent = [jnp.zeros_like(y) for y in groups.outputs[group]]
        cotangent[slot] = output_cotangents[t]
        dz, dparams = groups.vjps[group](cotangent)
        jac_z.append(dz)
        head_parts.append((groups.positions[group], list(dparams)))
    extra_grads = loss_vjp((jnp.zeros_like(task_losses), scale))[1]
    return task_losses, jnp.stack(jac_z), head_parts, extra_grads, aux


def _output_cotangents(plan, loss_vjp, task_losses, scale):
    """dL_t/dy for each task t, of the output its loss reads."""
    zero = jnp.zeros((), task_losses.dtype)
    if len(set(plan.task_outputs)) == len(plan.task_outputs):
        # Each output feeds one task: one vjp of the summed losses gives
        # every dL_t/dy_t (a vmap over one-hot cotangents would compute all
        # T x T blocks, T - 1 of every T of them zeros).
        per_output = loss_vjp((jnp.full(task_losses.shape, scale), zero))[0]
        return [per_output[i] for i in plan.task_outputs]
    # dL_t/dy for every task at once: the losses are cheap elementwise
    # functions of the outputs.
    one_hot = jnp.eye(plan.num_tasks, dtype=task_losses.dtype) * scale
    per_task = jax.vmap(lambda c: loss_vjp((c, zero))[0])(one_hot)
    return [per_task[i][t] for t, i in enumerate(plan.task_outputs)]


_Groups = collections.namedtuple("_Groups", ["outputs", "vjps", "positions", "place", "ys", "ntv"])


def _group_vjps(model, plan, state, z, ntv):
    """Each head group run once under its own vjp, with respect to Z and its
    own weights only (the others would come back as zeros to add, T times
    over)."""
    scope = _Scope(model)
    position = {id(v): i for i, v in enumerate(scope.trainable)}
    ys = [None] * len(plan.outputs)
    outputs, vjps, positions, place = [], [], [], {}
    for group, (indices, head) in enumerate(plan.head_groups):
        own = [position[id(v)] for v in head.trainable_variables]
        single = len(indices) == 1

        def head_fn(z, own_values, head=head, own=own, ntv=ntv, single=single):
            values = list(state.trainable)
            for i, value in zip(own, own_values, strict=True):
                values[i] = value
            y, new_ntv = scope.run(lambda: head(z, training=True), values, ntv)
            return ([y] if single else list(y)), new_ntv

        own_values = [state.trainable[i] for i in own]
        y_group, vjp, ntv = jax.vjp(head_fn, z, own_values, has_aux=True)
        for slot, output in enumerate(indices):
            ys[output] = y_group[slot]
            place[output] = (group, slot)
        outputs.append(y_group)
        vjps.append(vjp)
        positions.append(own)
    return _Groups(outputs, vjps, positions, place, ys, ntv)


def _loss_vjp(model, plan, batch, state, groups):
    """The losses as a function of the outputs (and the weights, for the
    extra loss), under one vjp."""
    scope = _Scope(model)

    def loss_fn(ys, trainable):
        y_pred = keras.tree.pack_sequence_as(plan.outputs_struct, ys)

        def run():
            total, task_losses, extra, _ = _losses_of(model, plan, batch, y_pred)
            return total, task_losses, extra

        (total, task_losses, extra), ntv, metrics = scope.run(run, trainable, groups.ntv, state.metrics)
        return (task_losses, extra), (y_pred, total, ntv, metrics)

    (task_losses, _), vjp, aux = jax.vjp(loss_fn, groups.ys, state.trainable, has_aux=True)
    return task_losses, vjp, aux


def _encoder_vjp(model, plan, batch, state):
    scope = _Scope(model)

    def encoder_fn(trainable):
        return scope.run(lambda: plan.split.encoder(batch.x, training=True), trainable, state.non_trainable)

    return jax.vjp(encoder_fn, state.trainable, has_aux=True)


def _weigh(model, plan, state, ntv, task_losses, gram, loss_scale):
    """The weights, head weights, the non-trainable values after the
    weighting's state updates, and the gradient of its own loss (or None)."""
    scope = _Scope(model)
    losses = jax.lax.stop_gradient(task_losses.astype("float32"))
    gram = jax.lax.stop_gradient(gram)
    has_loss = []

    def fn(trainable):
        def run():
            weights, head_weights = phases.task_weights(plan, losses, gram)
            return weights, head_weights, phases.weighting_loss(plan, losses, gram)

        (weights, head_weights, own), new_ntv = scope.run(run, trainable, ntv)
        has_loss.append(own is not None)
        own = jnp.zeros((), "float32") if own is None else own
        return own * loss_scale.astype(own.dtype), (weights, head_weights, new_ntv)

    if not plan.weighting.trainable_variables:
        _, (weights, head_weights, ntv) = fn(state.trainable)
        return jax.lax.stop_gradient(weights), head_weights, ntv, None
    (_, (weights, head_weights, ntv)), grads = jax.value_and_grad(fn, has_aux=True)(state.trainable)
    return jax.lax.stop_gradient(weights), head_weights, ntv, grads if has_loss[0] else None


def _aggregate(model, plan, state, ntv, jac_z, jacobians, task_losses, gram, encoder_vjp):
    """A `GradientAggregator`'s weights, head weights, the non-trainable
    values after its state updates, and the encoder's gradients as
    `(positions, grads)`."""
    scope = _Scope(model)
    losses = jax.lax.stop_gradient(task_losses.astype("float32"))
    if plan.in_parameters:
        # Only the shared weights' rows (the vjp gives zeros for the others).
        position = {id(v): i for i, v in enumerate(scope.trainable)}
        shared = [position[id(v)] for v in plan.split.encoder.trainable_variables]
        jacobians = [jacobians[i] for i in shared]
    out, ntv = scope.run(lambda: phases.aggregate(plan, jacobians, losses, gram), state.trainable, ntv)
    directions, weights, head_weights = out
    if plan.in_parameters:
        return weights, head_weights, ntv, (shared, directions)
    (encoder_grads,) = encoder_vjp(directions[0])
    return weights, head_weights, ntv, (range(len(state.trainable)), encoder_grads)


def _after_update(model, plan, batch, trainable, non_trainable, metrics, task_losses):
    """The non-trainable values after an `AfterUpdateHook` has seen the
    batch's losses with the updated weights (the metrics it touched are
    dropped)."""
    scope = _Scope(model)
    losses = jax.lax.stop_gradient(task_losses.astype("float32"))

    def run():
        plan.weighting.after_update(losses, phases.losses_after_update(model, plan, batch))

    _, non_trainable, _ = scope.run(run, trainable, non_trainable, metrics)
    return non_trainable


def _opaque_scalars(vector):
    """The entries of a (T,) vector as T scalars that XLA cannot fuse back
    into their consumers (they leave a while loop). Each head's update then
    takes its task's weight as an operand, and XLA compiles the identical
    update of identical heads once instead of once per head, with the
    weights' last computations copied into each (4-6 s of compile at T=40)."""
    def keep(i, values):  # x (i + 1) = x at i = 0, which XLA cannot see
        factor = (i + 1).astype(vector.dtype)
        return tuple(value * factor for value in values)

    count = (vector[0] == vector[0]).astype("int32")  # 1 or 0: unknown to XLA
    return list(jax.lax.fori_loop(0, count, keep, tuple(jnp.unstack(vector))))


def _largest_entry(values):
    """max |entry| over all `values` (NaN if one is NaN), one fused
    reduction per dtype, in the widest of them."""
    by_dtype = {}
    for value in values:
        if value is not None:
            by_dtype.setdefault(value.dtype, []).append(jnp.ravel(value))
    if not by_dtype:
        return jnp.zeros((), "float32")
    widest = jnp.result_type(*by_dtype)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.concatenate(flat))).astype(widest) for flat in by_dtype.values()]))


def _bounded(parts, head_parts, scales):
    """Whether the step's gradients are finite, from a bound on their
    entries that is NaN or Inf where any entry is: the sum over parts of
    their largest entries, the heads' own times the largest head weight.
    Read from the parts, not the sums: each head weight's product then
    fuses into the optimizer's update instead of being a kernel of its own
    per head variable (160 at T=40). A bound past the dtype's range (1e38
    in float32) refuses the step: no gradient of a working model is that
    large."""
    bound = sum(_largest_entry(values) for _, values in parts)
    heads = _largest_entry([value for _, values in head_parts for value in values])
    largest_weight = jnp.max(jnp.abs(jnp.stack(scales)))
    return jnp.isfinite(bound + heads.astype(largest_weight.dtype) * largest_weight)


def _gram_step(model, plan, batch, state, loss_scale):
    """Gram-matrix weightings: per-task gradients with respect to Z, the
    weights, one encoder backward."""
    z, encoder_vjp, ntv = _encoder_vjp(model, plan, batch, state)
    gradients = _separable_gradients if plan.separable else _grouped_gradients
    task_losses, jac_z, head_parts, extra_grads, aux = gradients(model, plan, batch, state, z, ntv, loss_scale)
    y_pred, total, ntv, metrics = aux
    if plan.in_parameters:
        jacobians = jax.vmap(lambda g: encoder_vjp(g)[0])(jac_z)
    else:
        jacobians = [jac_z]
    gram = phases.gram(jacobians, loss_scale)
    everything = range(len(state.trainable))
    if plan.aggregates:
        weights, head_weights, ntv, encoder_part = _aggregate(
            model, plan, state, ntv, jac_z, jacobians, task_losses, gram, encoder_vjp
        )
        parts = [encoder_part]
    else:
        weights, head_weights, ntv, weighting_grads = _weigh(model, plan, state, ntv, task_losses, gram, loss_scale)
        (encoder_grads,) = encoder_vjp(phases.combine(weights, jac_z))
        parts = [(everything, encoder_grads)] + ([(everything, weighting_grads)] if weighting_grads else [])
    if extra_grads is not None:
        parts.append((everything, extra_grads))
    scales = _opaque_scalars(head_weights.astype(task_losses.dtype))
    grads_ok = _bounded(parts, head_parts, scales)

    def grads():
        return phases.add_gradients(len(state.trainable), parts, head_parts, scales)

    return _Result(y_pred, total, task_losses, gram, weights, grads, grads_ok, ntv, metrics)


# The step -------------------------------------------------------------------


def _flag_index(model, plan, name="task_plus_one"):
    """Where a variable of `FirstNonfiniteTask` (its task, or its `cause`)
    sits in the metrics state."""
    flag = getattr(plan.trackers.nonfinite, name)
    for index, v in enumerate(model.metrics_variables):
        if v is flag:
            return index
    raise RuntimeError("keras_mgda: the non-finite flag is not a metric variable.")


def _metrics_after(model, plan, batch, result, decision, old_metrics, diagnosed):
    """The metrics updated for this step, rolled back (but the step
    records) when it is not taken; and the logs. `diagnosed`: the (task,
    cause) a bad step records."""
    scope = _Scope(model)
    mapping = list(zip(scope.metrics, result.metrics))
    with keras.StatelessScope(state_mapping=mapping) as stateless:
        phases.update_metrics(
            model, plan, batch, result.y_pred, result.total, result.weights, decision.logged_ok, result.gram
        )
        if plan.on_nonfinite == "raise":
            plan.trackers.nonfinite.update_state(decision.step_ok, *diagnosed)
    updated = _updated(stateless, scope.metrics, result.metrics)
    records = plan.record_variable_ids()
    kept = [
        new if id(v) in records else jnp.where(decision.step_ok, new, old)
        for v, new, old in zip(scope.metrics, updated, old_metrics, strict=True)
    ]
    with keras.StatelessScope(state_mapping=list(zip(scope.metrics, kept))) as stateless:
        logs = phases.train_logs(model, plan, decision.step_ok)
    return logs, _updated(stateless, scope.metrics, kept)


def train_step(model, state, data):
    state = State(*state)
    plan, batch = phases.begin(model, data)
    optimizer = model.optimizer
    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, state.optimizer))):
        loss_scale = keras.ops.convert_to_tensor(optimizer.scale_loss(1.0), "float32")
    step = _gram_step if plan.needs_gram else _loss_step
    result = step(model, plan, batch, state, loss_scale)
    decision = phases.decide(plan, optimizer, result.task_losses, result.gram, result.weights, result.grads_ok)
    if plan.on_nonfinite == "raise":
        # After a non-finite step, the rest of a multi-step execution
        # (steps_per_execution > 1) changes nothing either.
        clean = state.metrics[_flag_index(model, plan)] == 0
        decision = decision._replace(step_ok=jnp.logical_and(decision.step_ok, clean))
    # Before `_after_update`, whose forward records other data.
    diagnosed = None
    if plan.on_nonfinite == "raise":
        predictions = diagnosis.task_predictions(result.y_pred, plan.task_outputs)
        diagnosed = diagnosis.on_bad_step(
            plan.recorded, plan.num_tasks, batch.x, predictions, decision.step_ok, decision.bad_index
        )
    ok = decision.step_ok
    trainable, optimizer_values = _apply_or_keep(ok, optimizer, state, result.grads)
    non_trainable = result.non_trainable
    if plan.needs_losses_after_update:
        non_trainable = _after_update(
            model, plan, batch, trainable, non_trainable, result.metrics, result.task_losses
        )
    logs, metrics = _metrics_after(model, plan, batch, result, decision, state.metrics, diagnosed)
    return logs, (
        trainable,
        _select(ok, non_trainable, state.non_trainable),
        optimizer_values,
        metrics,
    )


def wrap_train_function(model, train_function):
    """Raises after a non-finite step (with `on_nonfinite="raise"`), and
    after an error inside the step, once the state from before that step
    is back on the model's variables."""

    def checked(state, data):
        plan = model.step_plan
        raising = plan is not None and plan.on_nonfinite == "raise"
        if raising:
            state = _with_flag_cleared(model, plan, state)
        try:
            logs, new_state = train_function(state, data)
        except BaseException as error:
            _keras.set_jax_state(model, state)
            plan = model.step_plan
            renamed = error if plan is None else diagnosis.task_exception(plan.task_names, error, plan.recorded, None)
            if renamed is error:
                raise
            raise renamed from error
        plan = model.step_plan
        if plan is not None and plan.on_nonfinite == "raise":
            # One scalar read per call: waits for the step, as Keras's own
            # logging does whenever a callback reads the logs.
            bad = int(new_state[3][_flag_index(model, plan)])
            if bad:
                _keras.set_jax_state(model, new_state)
                cause = int(new_state[3][_flag_index(model, plan, "cause")])
                raise diagnosis.error_for(plan.task_names, bad - 1, cause, plan.recorded)
        return _unpacked(plan, logs), new_state

    return checked


def _with_flag_cleared(model, plan, state):
    trainable, non_trainable, optimizer_values, metrics = state
    metrics = list(metrics)
    for name in ("task_plus_one", "cause"):
        index = _flag_index(model, plan, name)
        metrics[index] = jnp.zeros_like(metrics[index])
    return trainable, non_trainable, optimizer_values, metrics


def named_results(names, vector, packed):
    """A metric result vector by name: inside the step T slices, or one
    packed entry (`packed`: T slices would be T kernels to compile);
    NumPy scalars outside it (eager slices compile one program each)."""
    if not isinstance(vector, jax.core.Tracer):
        return dict(zip(names, np.asarray(vector), strict=True))
    if packed:
        return {PACKED_RESULTS: vector}
    return dict(zip(names, jnp.unstack(vector), strict=True))


def _unpacked(plan, logs):
    """The step's logs with the packed task weights split by name."""
    if not isinstance(logs, dict) or PACKED_RESULTS not in logs:
        return logs
    names = plan.trackers.alpha.result_names()
    logs = dict(logs)
    logs.update(named_results(names, logs.pop(PACKED_RESULTS), packed=True))
    return dict(sorted(logs.items()))  # Keras's logs are sorted by name
