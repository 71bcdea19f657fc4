"""The multi-task train step on PyTorch (eager torch.autograd).

The phases of `keras_mgda.step.phases`, run eagerly like Keras's own torch
trainer (`keras/src/backend/torch/trainer.py`): forward once; per-task
gradients dL_t/dZ through the heads only (one backward of the summed
losses when each head reads its own detached copy of Z, else one backward
per task from its own loss, so autograd visits that head only); the task
weights from the float32 Gram matrix; then ONE backward into the
variables' `.grad` (zeroed first, as Keras does), the finiteness decision
and `optimizer.apply` under `torch.no_grad()`.

In `mode="parameters"` the per-task gradients of the shared weights are
the vector-Jacobian products of Z with the per-task gradients G_t (chain
rule, vectorised), so the heads are differentiated once and the final
backward is the same as in the representation mode.

The losses and the Gram matrix come back to the host once, where the T x T
problem of a weighting that is `solvable_on_host` (MGDA, CAGrad, IMTL-G,
Nash-MTL, UPGrad) is solved with NumPy (`ops=numpy_ops`): a few hundred
NumPy calls on a 40 x 40 matrix cost a fraction of as many torch calls.
Other weightings that take `ops` run on direct torch calls (`torch_ops`).
Every decision is a Python `if` on host values.

An error raised anywhere in the step (a loss's own check, a label out of
range) puts back the protected state before it propagates; the weights and
the optimizer change only in the last phase, after every check.
Multi-process training: see `keras_mgda/backend/torch_distributed.py`.
"""

import collections

import keras
import numpy as np
import torch

from keras_mgda import _keras
from keras_mgda.backend import numpy_ops
from keras_mgda.backend import torch_ops
from keras_mgda.backend.torch_distributed import all_reduce_mean
from keras_mgda.backend.torch_distributed import average_gradients
from keras_mgda.backend.torch_distributed import world_size
from keras_mgda.step import diagnosis
from keras_mgda.step import phases

__all__ = ["prepare_plan", "train_step", "wrap_train_function"]

# What the gradient phase hands to the decision phase: `host` holds NumPy
# copies of the (global) losses, Gram matrix and weights.
_Result = collections.namedtuple("_Result", ["y_pred", "losses", "host", "weights"])


class _Tensors:
    """The torch tensors behind Keras variables, kept per plan.

    `Variable.value` costs about 8 us (it looks the device up by name on
    every read), 1 ms a step for a hundred variables. Safe to keep because
    Keras assigns by copying into the same tensor; refreshed whenever the
    list of variables asked for changes.
    """

    def __init__(self):
        self._cache = {}

    def of(self, key, variables):
        cached = self._cache.get(key)
        if (
            cached is not None
            and len(cached[0]) == len(variables)
            and all(a is b for a, b in zip(cached[0], variables))
        ):
            return cached[1]
        values = [v.value for v in variables]
        self._cache[key] = (list(variables), values)
        return values


def prepare_plan(plan, model):
    plan.backend_state = _Tensors()


def _to_host(*tensors):
    """float32 NumPy copies of the tensors (None stays None), read back from
    the device in one transfer."""
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


def _all_finite(grads):
    """Whether every gradient is finite, with one read-back.

    Uses the fused check of torch's own mixed-precision `GradScaler`
    (multiplying by 1 in place changes nothing), grouped by device and
    dtype as it requires: 0.07 ms for 160 head gradients on the CPU,
    against 0.3-0.8 ms for per-tensor norms.
    """
    groups = {}
    for g in grads:
        if g is not None:
            groups.setdefault((g.device, g.dtype), []).append(g)
    found = None
    for (device, _), group in groups.items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        found = flag if found is None else found + flag.to(found.device)
    return found is None or not bool(found.item())


# Per-task gradients -----------------------------------------------------------


def _batched_vjp(outputs, inputs, cotangents):
    """Vector-Jacobian products of `outputs` for each of the T stacked
    `cotangents` (shaped (T, *outputs.shape)): (T, *input.shape) tensors,
    zeros where an input is not reached. The graph is retained."""
    inputs = list(inputs)
    try:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=cotangents,
            is_grads_batched=True, retain_graph=True, allow_unused=True,
        )
    except (RuntimeError, NotImplementedError, TypeError):
        # Some ops have no vmap batching rule: one backward per task.
        per_task = [
            torch.autograd.grad(outputs, inputs, grad_outputs=c, retain_graph=True, allow_unused=True)
            for c in cotangents
        ]
        grads = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_task)]
    num_tasks = cotangents.shape[0]
    return [
        torch.zeros((num_tasks,) + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs, strict=True)
    ]


def _grad_or_zeros(output, source):
    (grad,) = torch.autograd.grad(output, [source], retain_graph=True, allow_unused=True)
    return torch.zeros_like(source) if grad is None else grad


def _heads_forward(plan, z):
    """The heads on detached copies of Z (one per output when separable), so
    that the encoder is reached only through the cotangent we build."""
    if plan.separable:
        copies = [z.detach().requires_grad_(True) for _ in plan.output_heads]
        outputs = [_keras.run_through_graph(h, c) for h, c in zip(plan.output_heads, copies, strict=True)]
        return keras.tree.pack_sequence_as(plan.outputs_struct, outputs), copies
    z_heads = z.detach().requires_grad_(True)
    return plan.split.heads(z_heads, training=True), [z_heads]


def _jacobian_z(plan, optimizer, losses, copies):
    """dL_t/dZ, (T, ...). Separable heads: one backward of the summed
    losses, which also leaves every head's own gradient in its `.grad`.
    Else one backward per task from its own loss: autograd then visits
    that task's head only (a batched backward from the stacked losses
    would run every head's backward for every task)."""
    if plan.separable:
        total = torch.sum(optimizer.scale_loss(torch.stack(losses.tasks)))
        if total.requires_grad:
            torch.autograd.backward(total)
        by_output = [torch.zeros_like(c) if c.grad is None else c.grad for c in copies]
        return torch.stack([by_output[i] for i in plan.task_outputs])
    (z_heads,) = copies
    return torch.stack([_grad_or_zeros(optimizer.scale_loss(value), z_heads) for value in losses.tasks])


def _gram(plan, model, z, jac_z, losses32, world):
    """The global losses, Gram matrix, and the per-task gradients in the
    weighting's space for an aggregator (None otherwise)."""
    spaces = [jac_z] if plan.aggregates else None
    if plan.in_parameters:
        # dL_t/dW = (dZ/dW)^T G_t, all tasks in one batched backward.
        encoder_values = [v.value for v in plan.split.encoder.trainable_variables]
        jac_w = _batched_vjp(z, encoder_values, jac_z) if z.requires_grad else []
        flat_w = torch.cat(
            [losses32.new_zeros((plan.num_tasks, 0))]
            + [j.reshape(plan.num_tasks, -1).float() for j in jac_w],
            dim=1,
        )
        losses32, flat_w = all_reduce_mean([losses32, flat_w], world)
        jacobians = [flat_w]
        if plan.aggregates:
            spaces = all_reduce_mean(jac_w, world) if jac_w else []
    else:
        jacobians = [jac_z]
    loss_scale = model.optimizer.scale_loss(torch.ones((), dtype=torch.float32))
    gram = phases.gram(jacobians, loss_scale, ops=torch_ops)
    if world > 1 and not plan.in_parameters:
        # Sum of the local Gram matrices / R^2: the Gram matrix of the
        # gradients of the mean of the processes' losses.
        losses32, gram = all_reduce_mean([losses32, gram], world)
        gram = gram / world
    return losses32, gram, spaces


def _aggregate(plan, spaces, losses32, gram):
    """A `GradientAggregator`'s directions, its weights, host copies of
    losses, Gram matrix and weights, and the head weights on the host."""
    directions, weights, head_weights = phases.aggregate(plan, spaces, losses32, gram, ops=torch_ops)
    weights = torch_ops.convert_to_tensor(weights).detach()
    head_weights = torch_ops.convert_to_tensor(head_weights)
    *host, host_head = _to_host(losses32, gram, weights, head_weights)
    return [d.detach() for d in directions], weights, tuple(host), host_head


def _add_to_grads(tensors, directions):
    """Adds an aggregator's shared-weight directions to the `.grad` of the
    encoder's weights (parameters mode)."""
    with torch.no_grad():
        for value, direction in zip(tensors, directions, strict=True):
            value.grad = direction.to(value.dtype) if value.grad is None else value.grad + direction


def _weigh(plan, losses32, gram):
    """The task weights (a torch tensor), host copies of losses, Gram
    matrix and weights, and the head weights on the host."""
    if plan.weighting.solvable_on_host:
        host_losses, host_gram = _to_host(losses32, gram)
        with np.errstate(all="ignore"):
            weights, head_weights = phases.task_weights(plan, host_losses, host_gram, ops=numpy_ops)
        on_device = torch.from_numpy(np.asarray(weights, np.float32)).to(gram.device)
        return on_device, (host_losses, host_gram, weights), np.asarray(head_weights)
    weights, head_weights = phases.task_weights(plan, losses32, gram, ops=torch_ops)
    weights = weights.detach()
    head_weights = torch_ops.convert_to_tensor(head_weights)
    *host, host_head = _to_host(losses32, gram, weights, head_weights)
    return weights, tuple(host), host_head


# Backward -------------------------------------------------------------------


def _scale_heads(plan, tensors, head_weights):
    """Weighs the gradients the separable heads already hold, in one call."""
    grads, scales = [], []
    for t, output in enumerate(plan.task_outputs):
        head = plan.output_heads[output]
        for value in tensors.of(("head", t), head.trainable_variables):
            if value.grad is not None:
                grads.append(value.grad)
                scales.append(float(head_weights[t]))
    if grads:
        with torch.no_grad():
            torch._foreach_mul_(grads, scales)


def _backward(targets, gradients):
    pairs = [(t, g) for t, g in zip(targets, gradients, strict=True) if t.requires_grad]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _gram_step(model, plan, batch, tensors, world):
    """Gram-matrix weightings: per-task gradients with respect to Z, the
    weights, one backward into `.grad`."""
    optimizer = model.optimizer
    z = plan.split.encoder(batch.x, training=True)
    y_pred, copies = _heads_forward(plan, z)
    model.zero_grad()  # as Keras's torch trainer does
    losses = phases.compute_losses(model, plan, batch, y_pred)
    jac_z = _jacobian_z(plan, optimizer, losses, copies)
    losses32 = torch.stack(losses.tasks).detach().float()
    losses32, gram, spaces = _gram(plan, model, z, jac_z, losses32, world)
    directions = None
    if plan.aggregates:
        directions, weights, host, head_weights = _aggregate(plan, spaces, losses32, gram)
        cotangent = None if plan.in_parameters else directions[0]
    else:
        weights, host, head_weights = _weigh(plan, losses32, gram)
        cotangent = phases.combine(weights, jac_z, ops=torch_ops)
    targets, gradients = ([], []) if cotangent is None else ([z], [cotangent])
    if plan.separable:
        _scale_heads(plan, tensors, head_weights)
    else:
        scaled = optimizer.scale_loss(torch.stack(losses.tasks))
        targets.append(scaled)
        gradients.append(torch.as_tensor(np.asarray(head_weights), dtype=scaled.dtype, device=scaled.device))
    own = phases.weighting_loss(plan, losses32, gram.detach())
    for value in (losses.extra, own):
        if value is not None:
            targets.append(optimizer.scale_loss(value))
            gradients.append(torch.ones_like(targets[-1]))
    _backward(targets, gradients)
    if cotangent is None:  # an aggregator's shared-weight gradients
        _add_to_grads(tensors.of("encoder", plan.split.encoder.trainable_variables), directions)
    return _Result(y_pred, losses, host, weights)


def _loss_step(model, plan, batch, tensors, world):
    """Loss-based weightings (and one task): one backward of sum_t w_t L_t,
    as Keras's own step."""
    optimizer = model.optimizer
    y_pred = model(batch.x, training=True)
    model.zero_grad()
    losses = phases.compute_losses(model, plan, batch, y_pred)
    task_losses = torch.stack(losses.tasks)
    constants = task_losses.detach().float()
    if world > 1:  # every process weighs the tasks by the global losses
        (constants,) = all_reduce_mean([constants], world)
    weights, _ = phases.task_weights(plan, constants, None)
    weights = torch_ops.convert_to_tensor(weights).detach()
    own = phases.weighting_loss(plan, constants, None)
    objective = phases.loss_objective(plan, losses, weights, own, optimizer.scale_loss)
    if objective.requires_grad:
        objective.backward()
    return _Result(y_pred, losses, tuple(_to_host(constants, None, weights)), weights)


# The step -------------------------------------------------------------------


def _take_step(model, plan, batch, tensors):
    """Runs the step; returns whether it was taken (it raises for a
    non-finite step with `on_nonfinite="raise"`)."""
    world = world_size()
    step = _gram_step if plan.needs_gram else _loss_step
    result = step(model, plan, batch, tensors, world)
    trainable = model.trainable_variables
    grads = [value.grad for value in tensors.of("trainable", trainable)]
    if world > 1:
        average_gradients(grads, world)
    with np.errstate(all="ignore"):
        decision = phases.decide(
            plan, model.optimizer, *result.host, _all_finite(grads), ops=numpy_ops
        )
    if not bool(decision.step_ok):
        if plan.on_nonfinite == "raise":
            predictions = diagnosis.task_predictions(result.y_pred, plan.task_outputs)
            task, cause = diagnosis.diagnose(plan.recorded, plan.num_tasks, batch.x, predictions)
            task = int(task) if int(cause) else int(decision.bad_index)
            raise diagnosis.error_for(plan.task_names, task, int(cause), plan.recorded)
        return False
    with torch.no_grad():
        model.optimizer.apply(grads, trainable)
        if plan.needs_losses_after_update:
            new_losses = phases.losses_after_update(model, plan, batch)
            if world > 1:
                (new_losses,) = all_reduce_mean([new_losses], world)
            constants = torch.from_numpy(np.asarray(result.host[0], np.float32))
            plan.weighting.after_update(constants.to(new_losses.device), new_losses)
    weights = result.weights.detach()
    phases.update_metrics(
        model, plan, batch, result.y_pred, result.losses.total, weights, bool(decision.logged_ok),
        result.host[1],
    )
    return True


def train_step(model, data):
    plan, batch = phases.begin(model, data)
    tensors = plan.backend_state
    protected = tensors.of("protected", plan.protected(model))
    # Direct clones: keras.ops.copy converts and checks each argument.
    saved = [t.detach().clone() for t in protected]
    try:
        taken = _take_step(model, plan, batch, tensors)
    except BaseException as error:
        with torch.no_grad():
            torch._foreach_copy_(protected, saved)
        renamed = diagnosis.task_exception(plan.task_names, error, plan.recorded, batch.x)
        if renamed is error:
            raise
        raise renamed from error
    if not taken:
        with torch.no_grad():
            torch._foreach_copy_(protected, saved)
    return phases.train_logs(model, plan, taken)


def wrap_train_function(model, train_function):
    """The eager step raises and restores by itself."""
    return train_function
