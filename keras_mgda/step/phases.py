"""The phases of the multi-task train step that are the same on every
backend, written once with `keras.ops` (or the namespace passed as `ops`).

A step, in order (see docs/architecture.md):

1. `begin`: unpack the batch, know the tasks (`StepPlan`), build the
   optimizer.
2. Forward: `z = encoder(x)`, `y = heads(z)`, `compute_losses` (the
   backend runs it under its autodiff).
3. Per-task gradients G_t = dL_t/dZ through the heads only (backend).
4. `gram` M = G G^T in float32 and `task_weights` from the weighting.
5. Encoder cotangent `combine(weights, G)`, one encoder backward, and the
   heads' gradients (backend), put together by `add_gradients`.
6. `decide`: whether the losses, gradients and weights are finite.
7. Apply or skip (backend), restoring the `protected` state on a bad step.
8. `update_metrics` and `train_logs`.
"""

import collections
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import keras

from keras_mgda import _keras
from keras_mgda.step.plan import StepPlan
from keras_mgda.types import Ops
from keras_mgda.types import Tensor
from keras_mgda.weighting.base import call_with_ops

if TYPE_CHECKING:
    from keras_mgda.model import MultiTaskModel

__all__ = [
    "Batch",
    "Decision",
    "Losses",
    "add_gradients",
    "aggregate",
    "begin",
    "combine",
    "compute_losses",
    "decide",
    "gradients_finite",
    "gram",
    "losses_after_update",
    "loss_objective",
    "nonfinite_error",
    "task_weights",
    "train_logs",
    "update_metrics",
    "weighting_loss",
]

Batch = collections.namedtuple("Batch", ["x", "y", "sample_weight"])
Losses = collections.namedtuple("Losses", ["total", "tasks", "extra"])
Decision = collections.namedtuple("Decision", ["per_task_ok", "logged_ok", "step_ok", "bad_index"])


def begin(model: "MultiTaskModel", data: Any) -> tuple[StepPlan, Batch]:
    """Unpacks a batch and makes sure the tasks and the optimizer exist.

    Returns:
        `(plan, batch)`: the model's `StepPlan` and a `Batch`.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    plan = model.step_plan_for(data)
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    return plan, Batch(x, y, sample_weight)


def compute_losses(model: keras.Model, plan: StepPlan, batch: Batch, y_pred: Any) -> Losses:
    """Keras's compiled loss on `y_pred`, with the per-task losses it
    recorded and the additional (regularisation, `add_loss`) loss.

    Returns:
        `Losses(total, tasks, extra)`: the total as Keras logs it, a list of
        T per-task scalars (with their `loss_weights`), and the extra loss or
        None.
    """
    plan.recorded.clear()  # no data of an earlier step on the error path
    total = _keras.compute_loss(model, batch.x, batch.y, y_pred, batch.sample_weight)
    dtype = plan.compile_loss.dtype
    return Losses(total, plan.task_losses(dtype), _keras.additional_loss(model))


def gram(jacobians: Iterable[Tensor], loss_scale: Tensor | float | None = None, *, ops: Ops = keras.ops) -> Tensor:
    """Gram matrix M = G G^T of per-task gradients, in float32.

    Args:
        jacobians: list of tensors shaped (T, ...), one per differentiated
            tensor (Z, or each shared weight); they are concatenated along
            the flattened trailing axes.
        loss_scale: optional scalar the losses were multiplied by before
            differentiation (mixed precision); it is divided out in float32.
        ops: the array namespace.

    Returns:
        float32 tensor (T, T).
    """
    result = None
    for jacobian in jacobians:
        # float32 before the products: float16 overflows at 65504.
        flat = ops.cast(ops.reshape(jacobian, (ops.shape(jacobian)[0], -1)), "float32")
        part = ops.matmul(flat, ops.transpose(flat))
        result = part if result is None else result + part
    if loss_scale is not None:
        # Unscaled once on the T x T result rather than on every gradient
        # entry (loss scales are powers of two: exact either way).
        scale = ops.cast(loss_scale, "float32")
        result = result / (scale * scale)
    return result


def combine(weights: Tensor, jacobian: Tensor, *, ops: Ops = keras.ops) -> Tensor:
    """The encoder cotangent sum_t weights_t * jacobian_t, in the
    jacobian's dtype."""
    weights = ops.cast(weights, jacobian.dtype)
    return ops.tensordot(weights, jacobian, axes=1)


def task_weights(
    plan: StepPlan, losses: Tensor, gram_matrix: Tensor | None, *, ops: Ops | None = None
) -> tuple[Tensor, Tensor]:
    """The weighting's task weights and head weights.

    Args:
        plan: the `StepPlan`.
        losses: float32 (T,) losses, constants.
        gram_matrix: float32 (T, T) or None.
        ops: None, or the array namespace to pass to a weighting whose
            `call` takes one.

    Returns:
        `(weights, head_weights)`, each (T,). One task has nothing to
        balance: weight 1, as plain Keras trains it.
    """
    weighting = plan.weighting
    if plan.num_tasks == 1:
        namespace = keras.ops if ops is None else ops
        one = namespace.ones_like(namespace.cast(losses, "float32"))
        return one, one
    weights = weighting(losses, gram_matrix, ops=ops)
    return weights, call_with_ops(weighting.head_weights, weights, ops=ops)


def aggregate(
    plan: StepPlan,
    gradients: list[Tensor],
    losses: Tensor,
    gram_matrix: Tensor,
    *,
    ops: Ops | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """A `GradientAggregator`'s update directions and task weights.

    Args:
        plan: the `StepPlan`.
        gradients: list of (T, ...) per-task gradients.
        losses: float32 (T,) losses, constants.
        gram_matrix: float32 (T, T).
        ops: None, or the array namespace to pass on.

    Returns:
        `(directions, weights, head_weights)`.
    """
    weighting = plan.weighting
    directions, weights = call_with_ops(weighting.aggregate, gradients, losses, gram_matrix, ops=ops)
    return directions, weights, call_with_ops(weighting.head_weights, weights, ops=ops)


def losses_after_update(model: keras.Model, plan: StepPlan, batch: Batch) -> Tensor:
    """The (T,) float32 task losses of the batch with the updated weights,
    what an `AfterUpdateHook` compares with the step's own losses.

    The forward runs in training mode, as the step's did, so that the two
    compare like with like: in inference mode dropout is off and BatchNorm
    reads its moving statistics, and the change between the two modes
    would swamp the update's (FAMO then learns from the modes, not from
    the step). Every non-trainable variable (BatchNorm statistics, dropout
    seeds) and the compiled loss's trackers are put back afterwards, so
    the extra forward changes nothing the user trained.
    """
    trackers = [v for m in _keras.compile_loss_trackers(model) for v in m.variables]
    state = trackers + list(model.non_trainable_variables)
    saved = [keras.ops.copy(v.value) for v in state]
    y_pred = model(batch.x, training=True)
    losses = compute_losses(model, plan, batch, y_pred)
    for v, old in zip(state, saved, strict=True):
        v.assign(old)
    return keras.ops.cast(keras.ops.stack(losses.tasks), "float32")


def weighting_loss(plan: StepPlan, losses: Tensor, gram_matrix: Tensor | None) -> Tensor | None:
    """The weighting's own objective for its trainable variables, or None
    (always None for one task)."""
    if plan.num_tasks == 1:
        return None
    return plan.weighting.loss(losses, gram_matrix)


def loss_objective(
    plan: StepPlan, losses: Losses, weights: Tensor, own: Tensor | None, scale: Callable[[Tensor], Tensor]
) -> Tensor:
    """What the step of a loss-based weighting differentiates.

    Args:
        plan: the `StepPlan`.
        losses: the step's `Losses`.
        weights: (T,) task weights, constants.
        own: the weighting's own loss, or None.
        scale: the optimizer's `scale_loss` (mixed precision).

    Returns:
        sum_t w_t L_t plus the extra loss and the weighting's own, each
        scaled; for one task, Keras's own total loss, so that the step is
        bitwise Keras's.
    """
    if plan.num_tasks == 1:
        return scale(losses.total)
    task_losses = keras.ops.stack(losses.tasks)
    value = keras.ops.sum(keras.ops.cast(weights, task_losses.dtype) * scale(task_losses))
    for term in (losses.extra, own):
        if term is not None:
            value = value + scale(keras.ops.cast(term, value.dtype))
    return value


def add_gradients(
    count: int,
    parts: Iterable[tuple[Sequence[int], Sequence[Tensor | None]]],
    head_parts: Iterable[tuple[Sequence[int], Sequence[Tensor | None]]] = (),
    head_weights: Tensor | Sequence[Tensor] | None = None,
) -> list[Tensor | None]:
    """Puts the step's gradients together, one per trainable variable.

    Args:
        count: the number of trainable variables.
        parts: iterable of `(positions, grads)`: gradients to add at those
            positions of the trainable list (the encoder's, the extra
            loss's, the weighting's), None entries skipped.
        head_parts: per task, `(positions, grads)` of its heads' own
            gradients, each multiplied by the task's head weight.
        head_weights: (T,) head weights, or a list of T scalars, when
            `head_parts` are given.

    Returns:
        A list of `count` gradients (None where nothing reached a variable).
    """
    grads = [None] * count

    def add(position, grad):
        grads[position] = grad if grads[position] is None else grads[position] + grad

    for positions, values in parts:
        for position, grad in zip(positions, values, strict=True):
            if grad is not None:
                add(position, grad)
    for task, (positions, values) in enumerate(head_parts):
        for position, grad in zip(positions, values, strict=True):
            if grad is not None:
                add(position, keras.ops.cast(head_weights[task], grad.dtype) * grad)
    return grads


def gradients_finite(
    grads: Iterable[Tensor | None], *, fused: bool = False, ops: Ops = keras.ops
) -> Tensor:
    """Whether every gradient is finite.

    Args:
        grads: the gradients (None entries are skipped).
        fused: one reduction over all of them, concatenated: under XLA
            (JAX) the concatenation fuses into the reduction instead of
            one kernel per gradient (15-30% less compile time for the
            T=40 step, docs/benchmarks.md); elsewhere it would copy
            every gradient. Otherwise one reduction per gradient (a sum:
            NaN or Inf anywhere makes it non-finite), as Keras's
            `LossScaleOptimizer` checks them.
        ops: the array namespace.

    Returns:
        A bool scalar.
    """
    grads = [g for g in grads if g is not None]
    if not grads:
        return ops.convert_to_tensor(True)
    if fused:
        by_dtype = {}  # no cast: a large float64 would overflow float32
        for g in grads:
            by_dtype.setdefault(str(g.dtype), []).append(ops.reshape(g, (-1,)))
        checks = [ops.all(ops.isfinite(ops.concatenate(flat))) for flat in by_dtype.values()]
        return ops.all(ops.stack(checks))
    sums = [ops.cast(ops.sum(g), "float32") for g in grads]
    return ops.all(ops.isfinite(ops.stack(sums)))


def decide(
    plan: StepPlan,
    optimizer: keras.optimizers.Optimizer,
    losses: Tensor,
    gram_matrix: Tensor | None,
    weights: Tensor,
    grads_ok: Tensor | bool,
    *,
    ops: Ops = keras.ops,
) -> Decision:
    """Whether this step's values are finite, decided alike on every backend.

    Args:
        plan: the `StepPlan`.
        optimizer: the model's optimizer.
        losses: (T,) task losses.
        gram_matrix: (T, T) Gram matrix or None.
        weights: (T,) task weights.
        grads_ok: bool scalar, whether every gradient the update applies is
            finite (`gradients_finite`).
        ops: the array namespace.

    Returns:
        `Decision(per_task_ok, logged_ok, step_ok, bad_index)`: per-task
        finiteness of loss and gradient; whether the weights may be logged;
        whether the update may be applied; the task at fault (T when none
        is: the shared weights' gradients or the weights). With a
        `LossScaleOptimizer`, overflowing scaled gradients are routine (it
        skips those steps and lowers its scale itself), so only the losses
        must be finite for the step.
    """
    per_task_ok = ops.isfinite(ops.cast(losses, "float32"))
    if gram_matrix is not None:
        # A task's own squared gradient norm: a NaN in one task's gradient
        # makes the whole row of M non-finite, for every other task too.
        own = ops.diagonal(gram_matrix)
        per_task_ok = ops.logical_and(per_task_ok, ops.isfinite(own))
    tasks_ok = ops.all(per_task_ok)
    logged_ok = ops.logical_and(tasks_ok, ops.all(ops.isfinite(weights)))
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        step_ok = ops.all(ops.isfinite(ops.cast(losses, "float32")))
    else:
        step_ok = ops.logical_and(logged_ok, grads_ok)
    first_bad = ops.argmax(ops.cast(ops.logical_not(per_task_ok), "int32"))
    bad_index = ops.where(tasks_ok, plan.num_tasks, first_bad)
    return Decision(per_task_ok, logged_ok, step_ok, bad_index)


def nonfinite_error(plan: StepPlan, bad_index: Tensor | int) -> FloatingPointError:
    """The error a non-finite step raises with `on_nonfinite="raise"`.

    Args:
        plan: the `StepPlan`.
        bad_index: the task at fault, or T for the shared weights.

    Returns:
        A `FloatingPointError` naming the task.
    """
    bad_index = int(bad_index)
    if bad_index < plan.num_tasks:
        where = plan.task_names[bad_index]
    else:
        where = "none (the shared weights' gradient or the task weights)"
    return FloatingPointError(
        "keras_mgda: a loss or gradient is NaN or Inf at this step; no weight, "
        "optimizer state, BatchNorm statistic or metric was changed. Lower the "
        "learning rate, check the data and the loss of that task, or compile "
        f"with on_nonfinite='skip' to skip such steps. Task: {where}"
    )


def update_metrics(
    model: keras.Model,
    plan: StepPlan,
    batch: Batch,
    y_pred: Any,
    total_loss: Tensor,
    weights: Tensor,
    logged_ok: Tensor | bool,
    gram: Tensor | None = None,
) -> None:
    """Updates the loss tracker, the task weights (and the last Gram
    matrix) and the compiled metrics (their results are computed once, in
    `train_logs`)."""
    _keras.loss_tracker(model).update_state(
        total_loss, sample_weight=_batch_size(batch.x)
    )
    plan.trackers.alpha.update_state(weights, logged_ok)
    if gram is not None:
        plan.trackers.gram.update_state(gram)
    if type(model).compute_metrics is not keras.Model.compute_metrics:
        model.compute_metrics(batch.x, batch.y, y_pred, sample_weight=batch.sample_weight)
    elif _keras.compile_metrics(model) is not None:
        # Keras's `compute_metrics` also computes every result, which eager
        # torch pays for (about 20 ms per step with 40 tasks).
        _keras.compile_metrics(model).update_state(batch.y, y_pred, batch.sample_weight)


def _batch_size(x):
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return keras.ops.shape(first)[0]


def train_logs(model: "MultiTaskModel", plan: StepPlan, step_taken: Tensor | bool) -> dict[str, Any]:
    """Counts a skipped step and returns the step's logs: Keras's metrics
    plus the task weights."""
    if isinstance(step_taken, bool):
        # Eager steps decide on the host: adding 0 is not worth an op.
        if not step_taken:
            plan.trackers.skipped.update_state(1.0)
    else:
        plan.trackers.skipped.update_state(1.0 - keras.ops.cast(step_taken, "float32"))
    return model.metrics_result_with_task_weights()
