"""Backend-agnostic pieces of the multi-task train step (keras.ops only):
the float32 Gram matrix, the encoder cotangent, and finiteness checks."""

import keras
from keras import ops


def gram_from_jacobians(jacobians, loss_scale=None, *, ops=ops):
    """Gram matrix M = G G^T of per-task gradients, in float32.

    Args:
        jacobians: list of tensors shaped (T, ...), one per differentiated
            tensor (Z, or each shared weight); they are concatenated along
            the flattened trailing axes.
        loss_scale: optional scalar the losses were multiplied by before
            differentiation (mixed precision); it is divided out in float32.

    Returns:
        float32 tensor (T, T).
    """
    gram = None
    for jacobian in jacobians:
        # float32 before the products: float16 overflows at 65504.
        flat = ops.cast(ops.reshape(jacobian, (ops.shape(jacobian)[0], -1)), "float32")
        part = ops.matmul(flat, ops.transpose(flat))
        gram = part if gram is None else gram + part
    if loss_scale is not None:
        # Unscaled once on the T x T result rather than on every gradient
        # entry (loss scales are powers of two: exact either way).
        scale = ops.cast(loss_scale, "float32")
        gram = gram / (scale * scale)
    return gram


def combine(weights, jacobian, *, ops=ops):
    """sum_t weights_t * jacobian_t, in the jacobian's dtype.

    Args:
        weights: (T,) task weights.
        jacobian: (T, ...) per-task gradients.

    Returns:
        A tensor shaped like `jacobian[0]`.
    """
    weights = ops.cast(weights, jacobian.dtype)
    return ops.tensordot(weights, jacobian, axes=1)


def task_finite(losses, gram, *, ops=ops):
    """Per-task flags: the task's loss and gradient are finite.

    Args:
        losses: (T,) losses.
        gram: (T, T) Gram matrix or None.

    Returns:
        bool tensor (T,).
    """
    finite = ops.isfinite(ops.cast(losses, "float32"))
    if gram is not None:
        rows_finite = ops.all(ops.isfinite(gram), axis=-1)
        finite = ops.logical_and(finite, rows_finite)
    return finite


def weights_finite(weights, *, ops=ops):
    return ops.all(ops.isfinite(weights))


def step_flags(optimizer, losses, gram, weights, *, ops=ops):
    """Whether this step's values are finite, shared by every backend.

    Args:
        optimizer: the model's optimizer.
        losses: (T,) task losses.
        gram: (T, T) Gram matrix or None.
        weights: (T,) task weights.

    Returns:
        `(per_task_ok, logged_ok, step_ok)`: per-task finiteness; whether the
        weights may be logged; whether the update may be applied. With a
        `LossScaleOptimizer`, overflowing scaled gradients are routine (it
        skips those steps and lowers its scale itself), so only the losses
        must be finite for the step.
    """
    per_task_ok = task_finite(losses, gram, ops=ops)
    logged_ok = ops.logical_and(ops.all(per_task_ok), weights_finite(weights, ops=ops))
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return per_task_ok, logged_ok, ops.all(task_finite(losses, None, ops=ops))
    return per_task_ok, logged_ok, logged_ok


def batch_size(x):
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return ops.shape(first)[0]


def step_record_ids(model):
    """Ids of the variables that record skipped and non-finite steps: a
    skipped step must still update them, so they are never rolled back."""
    parts = model._parts
    return {
        id(v)
        for tracker in (parts.skipped_tracker, parts.nonfinite_tracker)
        if tracker is not None
        for v in tracker.variables
    }


def state_to_protect(model):
    """Variables a bad step must leave untouched besides the trainable ones
    and the optimizer: BatchNorm statistics and similar non-trainable state
    (a NaN batch would poison them) and the metrics (a skipped step is not
    counted in the epoch's averages)."""
    excluded = step_record_ids(model)
    variables = list(model.non_trainable_variables) + list(model.metrics_variables)
    seen, protected = set(), []
    for v in variables:
        if id(v) in excluded or id(v) in seen:
            continue
        seen.add(id(v))
        protected.append(v)
    return protected


def snapshot(variables):
    return [ops.copy(v.value) for v in variables]


def restore_unless(ok, variables, saved):
    """Puts back the saved values when `ok` is False (no Python branching on
    tensors, so it works under jit)."""
    for v, old in zip(variables, saved):
        v.assign(ops.where(ok, v.value, old))
