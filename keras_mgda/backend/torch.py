"""The multi-task train step on PyTorch (torch.autograd, torch.distributed).

The step runs eagerly, like Keras's own torch trainer
(`keras/src/backend/torch/trainer.py`): forward once, per-task gradients
with respect to the shared representation Z through the heads only (one
backward per task from its own loss, so autograd visits that head only),
the task weights
from the float32 Gram matrix, then ONE backward into the variables'
`.grad` (zeroed first, as Keras does) and `optimizer.apply` under
`torch.no_grad()`.

In `mode="parameters"` the per-task gradients of the shared weights are
the vector-Jacobian products of Z with the per-task gradients G_t = dL_t/dZ
(chain rule, vectorised the same way), so the heads are differentiated
once and the final backward is the same as in the representation mode.

Multi-process data parallelism (`torch.distributed`):
    Keras's torch trainer does not synchronise anything across processes.
    When a process group with more than one process is initialised, this
    step does what DistributedDataParallel would do and more, so that
    `model.fit` run in every process (each on its shard of the data) trains
    one model:

    - the global problem is the mean over processes of the per-process
      losses (each a mean over its local batch, as Keras computes it; with
      equal local batch sizes this is the loss of the global batch);
    - every process solves that same problem: the task losses are averaged
      across processes, and so is the Gram matrix of the global gradients
      (representation mode: the sum of the local Gram matrices divided by
      R^2, since dL/dZ of the global loss is 1/R times the local one on
      each process's rows of Z; parameters mode: the Gram matrix of the
      per-task gradients averaged across processes);
    - the gradients are averaged across processes (all-reduce of `.grad`,
      as DDP does) before the optimizer applies them.

    The models must start from the same weights (broadcast them, or seed
    the initialisers identically) and every process must take the same
    code path (the same model and compiled losses). Whether a step is
    taken, skipped or raises is decided from the all-reduced losses and Gram
    matrix, so all processes agree. Logged losses and metrics are those of
    the local process, as with DDP; the logged task weights are global.
    Do not wrap the model in DistributedDataParallel for `fit`: this step
    already averages the gradients. In `mode="parameters"` the per-task
    gradients of the shared weights (T times their size) are all-reduced
    too, which exact MGDA across processes cannot avoid.

    Every decision that needs a value (raise or skip a non-finite step) is
    a Python `if` on one boolean, a single device-to-host read per step.

The losses and the Gram matrix come back to the host in that one read, and
the T x T problem of a stateless weighting that declares
`host_solvable` (MGDA, CAGrad, IMTL-G, Nash-MTL, UPGrad) is solved there,
on NumPy arrays, by the same code (`solvers.op_namespace(numpy_ops)`);
other weightings run on direct torch calls (`torch_ops`).
"""

import keras
import numpy as np
import torch
import torch.distributed as dist
from keras import ops

from keras_mgda import step
from keras_mgda.weighting.base import call_with_ops
from keras_mgda.backend import numpy_ops
from keras_mgda.backend import torch_ops

# Gradients are all-reduced in buckets of at most this many elements.
_BUCKET_ELEMENTS = 1 << 22


def _world_size():
    """The number of processes training together, or 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_mean(tensors, world):
    """Averages detached float tensors across processes with one collective;
    returns new tensors."""
    tensors = [t.detach() for t in tensors]
    if world == 1:
        return tensors
    dtype = tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat / world
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def _average_gradients(grads, world):
    """Averages the gradients across processes in place (as DDP does), in
    buckets of at most `_BUCKET_ELEMENTS` elements of one dtype."""
    buckets = {}  # (dtype, device) -> list of [size, [tensors]]
    for g in grads:
        if g is None:
            continue
        same_kind = buckets.setdefault((g.dtype, g.device), [])
        if not same_kind or same_kind[-1][0] + g.numel() > _BUCKET_ELEMENTS:
            same_kind.append([0, []])
        same_kind[-1][0] += g.numel()
        same_kind[-1][1].append(g)
    with torch.no_grad():
        for same_kind in buckets.values():
            for _, bucket in same_kind:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat.div_(world)
                start = 0
                for g in bucket:
                    g.copy_(flat[start:start + g.numel()].view_as(g))
                    start += g.numel()


def _batched_vjp(outputs, inputs, cotangents):
    """Vector-Jacobian products of `outputs` for each of the T stacked
    `cotangents` (shaped (T, *outputs.shape)): a tuple of (T, *input.shape)
    tensors, zeros where an input is not reached. The graph is retained."""
    inputs = list(inputs)
    try:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=cotangents,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
    except (RuntimeError, NotImplementedError, TypeError):
        # Some ops have no vmap batching rule: one backward per task.
        per_task = [
            torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=cotangent,
                retain_graph=True,
                allow_unused=True,
            )
            for cotangent in cotangents
        ]
        grads = [
            None if parts[0] is None else torch.stack(parts)
            for parts in zip(*per_task)
        ]
    num_tasks = cotangents.shape[0]
    return [
        torch.zeros((num_tasks,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        if g is None
        else g
        for g, x in zip(grads, inputs)
    ]


def _grad_or_zeros(output, source):
    (grad,) = torch.autograd.grad(
        output, [source], retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(source) if grad is None else grad


def _training_call(operation):
    if not getattr(operation, "_call_has_training_arg", False):
        return operation

    def call(*args, **kwargs):
        kwargs["training"] = True
        return operation(*args, **kwargs)

    return call


def _run_head(head, z):
    """`head(z, training=True)` for a functional head, through its graph
    directly: the functional model's own `__call__` (input checks, scopes)
    costs about 0.4 ms per head in eager torch, 15 ms a step with 40
    heads, more than the heads' layers themselves."""
    run = getattr(head, "_run_through_graph", None)
    if run is None:  # Not a functional model as Keras 3.10+ builds them.
        return head(z, training=True)
    return run(z, operation_fn=_training_call)


def _separable_heads(model):
    """`(output_heads, task_of_output, head_variables)` when every output
    feeds exactly one task and the outputs' heads share no layer (the usual
    multi-head model), else None. `task_of_output[t]` is task t's output;
    `head_variables[t]` are the trainable variables of task t's head. Cached
    on the model."""
    parts = model._parts
    # Keyed by the compiled loss: recompiling can change the tasks.
    cached = getattr(parts, "torch_separable_heads", None)
    if cached is not None and cached[0] is model._compile_loss:
        return cached[1]
    result = None
    output_heads = model._output_heads()
    task_of_output = model._task_output_indices()
    if sorted(task_of_output) == list(range(len(output_heads))):
        disjoint = len(model._head_groups()) == len(output_heads)
        head_variables = set().union(
            *({id(v) for v in head.trainable_variables} for head in output_heads)
        )
        encoder_variables = {id(v) for v in model.encoder.trainable_variables}
        if disjoint and not encoder_variables & head_variables:
            result = (
                output_heads,
                task_of_output,
                [output_heads[i].trainable_variables for i in task_of_output],
            )
    parts.torch_separable_heads = (model._compile_loss, result)
    return result


def _unique(variables):
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def _restore(variables, saved):
    for v, old in zip(variables, saved):
        v.assign(old)


def _protected_state(model):
    """The state the forward pass, the compiled loss's per-output trackers
    and the weighting change before the step is decided: the non-trainable
    variables and the loss trackers' variables (eager, so the other metrics
    are simply not updated on a skipped step). Cached per compiled loss:
    collecting them walks every layer (0.3 ms a step with 40 heads)."""
    parts = model._parts
    cached = getattr(parts, "torch_protected_state", None)
    if cached is not None and cached[0] is model._compile_loss:
        return cached[1]
    loss_trackers = [m for m in getattr(model._compile_loss, "metrics", []) if m]
    protected = _unique(
        list(model.non_trainable_variables)
        + [v for m in loss_trackers for v in m.variables]
    )
    parts.torch_protected_state = (model._compile_loss, protected)
    return protected


def _values(model, key, variables):
    """The torch tensors behind Keras variables, cached while `variables`
    is the same list: `Variable.value` costs about 8 us (it looks the device
    up by name on every read), 1 ms a step for a hundred variables. Safe to
    cache because Keras assigns by copying into the same tensor."""
    cache = model._parts.__dict__.setdefault("torch_values", {})
    cached = cache.get(key)
    if (
        cached is not None
        and len(cached[0]) == len(variables)
        and all(a is b for a, b in zip(cached[0], variables))
    ):
        return cached[1]
    values = [v.value for v in variables]
    cache[key] = (list(variables), values)
    return values


def _snapshot(values):
    # Direct clones: keras.ops.copy converts and checks each argument.
    return [t.detach().clone() for t in values]


def _to_host(*tensors):
    """float32 NumPy copies of the tensors (None stays None), read back
    from the device in one transfer."""
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.detach().reshape(-1).float() for t in present]).cpu().numpy()
    out, start = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[start:start + t.numel()].reshape(tuple(t.shape)))
        start += t.numel()
    return out


def _solves_on_host(weighting):
    """Whether the weighting's T x T problem is solved with NumPy
    (`Weighting.solvable_on_host`). Its inputs are read back once for the
    finiteness check anyway, and the solver's few hundred small ops are
    cheaper there than as torch calls (kernel launches on a GPU)."""
    return weighting.solvable_on_host


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
    protected = _protected_state(model)
    saved = _snapshot(_values(model, "protected", protected))
    world = _world_size()

    z = encoder(x, training=True)
    split = _separable_heads(model) if needs_gram else None
    if split is not None:
        # Each output's head reads its own detached copy of Z, so one
        # backward of the summed losses gives every dL_t/dZ at once (in
        # that copy's .grad) and every head's own gradient; the encoder is
        # reached only through the cotangent we build, once.
        output_heads, task_of_output, head_variables = split
        head_values = [
            _values(model, ("head", t), variables)
            for t, variables in enumerate(head_variables)
        ]
        z_copies = [z.detach().requires_grad_(True) for _ in output_heads]
        y_pred = keras.tree.pack_sequence_as(
            model._outputs_struct,
            [_run_head(head, c) for head, c in zip(output_heads, z_copies)],
        )
    elif needs_gram:
        # The heads read a detached copy of Z: the encoder is then reached
        # only through the cotangent we build, once.
        z_heads = z.detach().requires_grad_(True)
        y_pred = heads(z_heads, training=True)
    else:
        y_pred = heads(z, training=True)
    # Clear the gradients left by the previous step, as Keras's torch
    # trainer does (torch.nn.Module.zero_grad).
    model.zero_grad()
    loss = model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    task_loss_list = model._task_loss_list()
    task_losses = torch.stack(task_loss_list)
    extra = model._additional_loss()
    scaled_losses = optimizer.scale_loss(task_losses)
    scaled_extra = None if extra is None else optimizer.scale_loss(extra)

    gram = None
    if needs_gram:
        num_tasks = scaled_losses.shape[0]
        if split is not None:
            # One backward for all tasks: the heads' .grad get each task's
            # own, unweighted gradient (scaled by the head weights below).
            if scaled_losses.requires_grad:
                torch.autograd.backward(torch.sum(scaled_losses))
            by_output = [
                torch.zeros_like(c) if c.grad is None else c.grad for c in z_copies
            ]
            jac_z = torch.stack([by_output[i] for i in task_of_output])
        else:
            # One backward per task from its own loss: autograd then visits
            # that task's head only (a batched backward from the stacked
            # losses would run every head's backward for every task: T^2
            # head backwards).
            jac_z = torch.stack(
                [
                    _grad_or_zeros(optimizer.scale_loss(l), z_heads)
                    for l in task_loss_list
                ]
            )
        losses32 = task_losses.detach().float()
        if in_parameters:
            # dL_t/dW = (dZ/dW)^T G_t, all tasks in one batched backward.
            encoder_values = [v.value for v in encoder.trainable_variables]
            jac_w = (
                _batched_vjp(z, encoder_values, jac_z) if z.requires_grad else []
            )
            flat_w = torch.cat(
                [losses32.new_zeros((num_tasks, 0))]
                + [j.reshape(num_tasks, -1).float() for j in jac_w],
                dim=1,
            )
            losses32, flat_w = _all_reduce_mean([losses32, flat_w], world)
            jacobians = [flat_w]
        else:
            jacobians = [jac_z]
        loss_scale = optimizer.scale_loss(torch.ones((), dtype=torch.float32))
        gram = step.gram_from_jacobians(jacobians, loss_scale, ops=torch_ops)
        if world > 1 and not in_parameters:
            # Sum of the local Gram matrices / R^2: the Gram matrix of the
            # gradients of the mean of the processes' losses.
            losses32, gram = _all_reduce_mean([losses32, gram], world)
            gram = gram / world
        losses_for_check = losses32
        if _solves_on_host(weighting):
            host_losses, host_gram = _to_host(losses32, gram)
            with np.errstate(all="ignore"):
                host_weights = weighting(host_losses, host_gram, ops=numpy_ops)
                host_head_weights = call_with_ops(weighting.head_weights, host_weights, ops=numpy_ops)
            weights = torch.from_numpy(np.array(host_weights, np.float32)).to(gram.device)
            host_values = (host_losses, host_gram, host_weights)
        else:
            weights = weighting(losses32, gram, ops=torch_ops).detach()
            head_weights = torch_ops.convert_to_tensor(
                call_with_ops(weighting.head_weights, weights, ops=torch_ops)
            )
            *host_values, host_head_weights = _to_host(losses32, gram, weights, head_weights)
        weighting_loss = weighting.loss(losses32, gram.detach())
    else:
        losses_for_check = task_losses.detach().float()
        if world > 1:
            # Every process weighs the tasks by the global losses.
            (losses_for_check,) = _all_reduce_mean([losses_for_check], world)
        weights = weighting(losses_for_check).detach()
        weighting_loss = weighting.loss(losses_for_check, None)
        host_values = _to_host(losses_for_check, None, weights)

    # The flags are decided on the host from one read-back (the step
    # branches on them in Python anyway), and from all-reduced values, so
    # all processes agree without another collective.
    with np.errstate(all="ignore"):
        per_task_ok, logged_ok, step_ok = step.step_flags(optimizer, *host_values, ops=numpy_ops)
    take_step = bool(step_ok)

    if not take_step and model.on_nonfinite == "raise":
        _restore(protected, saved)
        bad = [
            name
            for name, ok in zip(model.task_names, per_task_ok.tolist())
            if not ok
        ]
        bad_task = bad[0] if bad else model.task_names[0]
        raise FloatingPointError(f"{model.nonfinite_message()} {bad_task}")

    if take_step:
        if needs_gram:
            cotangent = step.combine(weights, jac_z, ops=torch_ops)
            if split is not None:
                # The heads already hold their tasks' gradients: weigh them,
                # all in one call.
                head_grads, head_scales = [], []
                for scale, values in zip(host_head_weights.tolist(), head_values):
                    for value in values:
                        if value.grad is not None:
                            head_grads.append(value.grad)
                            head_scales.append(scale)
                if head_grads:
                    with torch.no_grad():
                        torch._foreach_mul_(head_grads, head_scales)
                targets, output_gradients = [z], [cotangent]
            else:
                targets = [z, scaled_losses]
                output_gradients = [
                    cotangent,
                    torch.from_numpy(np.array(host_head_weights, np.float32)).to(
                        device=scaled_losses.device, dtype=scaled_losses.dtype
                    ),
                ]
            if scaled_extra is not None:
                targets.append(scaled_extra)
                output_gradients.append(torch.ones_like(scaled_extra))
            if weighting_loss is not None:
                targets.append(optimizer.scale_loss(weighting_loss))
                output_gradients.append(torch.ones_like(weighting_loss))
            pairs = [
                (t, g) for t, g in zip(targets, output_gradients) if t.requires_grad
            ]
            if pairs:
                torch.autograd.backward(
                    [t for t, _ in pairs], [g for _, g in pairs]
                )
        else:
            objective = torch.sum(weights.to(scaled_losses.dtype) * scaled_losses)
            if scaled_extra is not None:
                objective = objective + scaled_extra
            if weighting_loss is not None:
                objective = objective + optimizer.scale_loss(weighting_loss).to(
                    objective.dtype
                )
            if objective.requires_grad:
                objective.backward()
        grads = [value.grad for value in _values(model, "trainable", trainable)]
        if world > 1:
            _average_gradients(grads, world)
        with torch.no_grad():
            optimizer.apply(grads, trainable)

    weights = weights.detach()
    if take_step:
        model._loss_tracker.update_state(loss, sample_weight=step.batch_size(x))
        model._update_task_trackers(weights, bool(logged_ok))
        model._update_metrics(x, y, y_pred, sample_weight)
    else:
        _restore(protected, saved)
    return model._train_logs(take_step)
