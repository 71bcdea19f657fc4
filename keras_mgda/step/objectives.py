"""The per-task losses of a compiled model as pure functions of its
variables: what the second-order backend primitives (task gradients and
Hessian-vector products, `keras_mgda/backend/*_hvp.py`) differentiate.

The model runs in inference mode (`training=False`: BatchNorm reads its
moving statistics, dropout is off) and inside a `keras.StatelessScope`, so
nothing is written to any variable: Keras's compiled loss updates its
`<output>_loss` trackers as it computes, and the scope captures those
updates and drops them. That is simpler than saving and restoring the
trackers, and it also holds inside `jax.jit` and `tf.function`, where an
assign-then-restore would be traced into the compiled function.
"""

import keras

from keras_mgda import _keras
from keras_mgda.step import phases

__all__ = ["as_batch", "inference_task_losses"]


def as_batch(data):
    """`(x, y)` or `(x, y, sample_weight)`, as `fit` takes one batch, as a
    `phases.Batch`."""
    if isinstance(data, phases.Batch):
        return data
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(data))
    return phases.Batch(x, y, sample_weight)


def inference_task_losses(model, plan, batch, state_mapping=()):
    """The T task losses of one batch, in inference mode, changing nothing.

    Args:
        model: a compiled `MultiTaskModel`.
        plan: its `StepPlan` (`model.step_plan_for(data)`).
        batch: a `phases.Batch`.
        state_mapping: `(variable, value)` pairs the model reads instead of
            its variables (JAX differentiates with respect to the values);
            empty on TensorFlow and torch, which watch the variables.

    Returns:
        A (T,) tensor in the compiled loss's dtype: each task's loss with its
        `loss_weights`, weighted by `batch.sample_weight` when given, as
        `fit` computes it; regularisation and `add_loss` terms are not part
        of any task.
    """
    with keras.StatelessScope(state_mapping=list(state_mapping)):
        y_pred = model(batch.x, training=False)
        # Runs every entry of the compiled loss, whose recorders fill
        # `plan.recorded`; the total it returns is not needed.
        _keras.compile_loss(model)(batch.y, y_pred, batch.sample_weight)
        values = plan.task_losses(plan.compile_loss.dtype)
    return keras.ops.stack(values)
