"""Second-order primitives on TensorFlow: per-task gradients and exact
Hessian-vector products with respect to chosen variables, in `tf.function`.

The model runs in inference mode and changes no variable (see
`keras_mgda.step.objectives`). The Hessian-vector product is
forward-over-reverse: a `tf.autodiff.ForwardAccumulator` whose tangents are
the vectors, around the `GradientTape` of sum_t c_t L_t; the accumulator's
JVP of the gradient is H v. About the cost of two gradients, and no
(parameters x parameters) or (T x parameters) matrix. The traced functions
are cached on the model's `StepPlan`, per list of variables
(`reduce_retracing`: a last, smaller batch does not trace them again).
"""

import tensorflow as tf

from keras_mgda.step import objectives

__all__ = ["hessian_vector_product", "task_gradients", "task_jvp", "weighted_gradient"]

_ZERO = tf.UnconnectedGradients.ZERO


class _Functions:
    """The traced primitives of one model and one list of variables."""

    def __init__(self, model, plan, variables):
        # The `tf.Variable`s behind the Keras variables: what tapes watch.
        self.values = [v.value for v in variables]
        self.num_tasks = plan.num_tasks
        self.losses = lambda batch: objectives.inference_task_losses(model, plan, batch)
        self.gradients = tf.function(self._gradients, reduce_retracing=True)
        self.hvp = tf.function(self._hvp, reduce_retracing=True)
        self.weighted_gradient = tf.function(self._weighted_gradient, reduce_retracing=True)
        self.jvp = tf.function(self._jvp, reduce_retracing=True)

    def _gradients(self, batch):
        with tf.GradientTape(persistent=True) as tape:
            losses = self.losses(batch)
            per_task = [losses[t] for t in range(self.num_tasks)]
        grads = [tape.gradient(loss, self.values, unconnected_gradients=_ZERO) for loss in per_task]
        del tape
        return losses, grads

    def _weighted_gradient(self, batch, coefficients):
        with tf.GradientTape() as tape:
            losses = self.losses(batch)
            total = tf.reduce_sum(tf.cast(coefficients, losses.dtype) * losses)
        return losses, tape.gradient(total, self.values, unconnected_gradients=_ZERO)

    def _jvp(self, batch, vectors):
        with tf.autodiff.ForwardAccumulator(self.values, vectors) as accumulator:
            losses = self.losses(batch)
        return accumulator.jvp(losses, unconnected_gradients=_ZERO)

    def _hvp(self, batch, coefficients, vectors):
        with tf.autodiff.ForwardAccumulator(self.values, vectors) as accumulator:
            with tf.GradientTape() as tape:
                losses = self.losses(batch)
                total = tf.reduce_sum(tf.cast(coefficients, losses.dtype) * losses)
            grads = tape.gradient(total, self.values, unconnected_gradients=_ZERO)
        return [accumulator.jvp(g, unconnected_gradients=_ZERO) for g in grads]


def _functions(model, variables, batch):
    batch = objectives.as_batch(batch)
    plan = model.step_plan_for(tuple(batch))
    key = ("tensorflow_hvp", tuple(id(v) for v in variables))
    # The plan lives as long as the compilation: a recompiled model (new
    # losses) gets new functions.
    return plan._cached(key, lambda: _Functions(model, plan, variables)), batch


def task_gradients(model, variables, batch):
    """Per-task losses and their gradients with respect to `variables`.

    Args:
        model: a compiled `MultiTaskModel`.
        variables: a list of its trainable variables.
        batch: `(x, y)` or `(x, y, sample_weight)` tensors.

    Returns:
        `(losses, grads)`: losses (T,), and per task a list of gradients
        shaped like `variables` (zeros where a task does not reach one).
    """
    functions, batch = _functions(model, variables, batch)
    losses, grads = functions.gradients(batch)
    return losses, [list(g) for g in grads]


def hessian_vector_product(model, variables, batch, coefficients, vectors):
    """The product of the Hessian of sum_t coefficients_t L_t (with respect
    to `variables`, in inference mode) with `vectors`.

    Args:
        model: a compiled `MultiTaskModel`.
        variables: a list of its trainable variables.
        batch: `(x, y)` or `(x, y, sample_weight)` tensors.
        coefficients: (T,) weights of the task losses.
        vectors: tensors shaped like `variables`.

    Returns:
        A list of tensors shaped like `variables`.
    """
    functions, batch = _functions(model, variables, batch)
    values = functions.values
    coefficients = tf.convert_to_tensor(coefficients, dtype=values[0].dtype)
    vectors = [tf.convert_to_tensor(v, dtype=x.dtype) for v, x in zip(vectors, values, strict=True)]
    return list(functions.hvp(batch, coefficients, vectors))


def weighted_gradient(model, variables, batch, coefficients):
    """The task losses (T,) and the gradient of sum_t coefficients_t L_t
    with respect to `variables` (a list shaped like them): J^T c, one
    backward pass."""
    functions, batch = _functions(model, variables, batch)
    coefficients = tf.convert_to_tensor(coefficients, dtype=functions.values[0].dtype)
    losses, grads = functions.weighted_gradient(batch, coefficients)
    return losses, list(grads)


def task_jvp(model, variables, batch, vectors):
    """J v: each task loss's directional derivative along `vectors` (T,),
    one forward-mode pass."""
    functions, batch = _functions(model, variables, batch)
    vectors = [tf.convert_to_tensor(v, dtype=x.dtype) for v, x in zip(vectors, functions.values, strict=True)]
    return functions.jvp(batch, vectors)
