"""Second-order primitives on JAX: per-task gradients and exact
Hessian-vector products with respect to chosen variables, jitted.

The losses are a pure function of the variables' values (the model runs
inside a `keras.StatelessScope` mapping every variable to a value, in
inference mode: see `keras_mgda.step.objectives`). The Hessian-vector
product is forward-over-reverse, `jax.jvp` of `jax.grad`: about the cost of
two gradients, and no (parameters x parameters) or (T x parameters) matrix.
Every value is an argument of the jitted function, never a constant baked
into it, so one compilation serves every point of an exploration; it is
cached on the model's `StepPlan`, per list of variables.
"""

import jax
import jax.numpy as jnp

from keras_mgda.step import objectives

__all__ = ["hessian_solve", "hessian_vector_product", "task_gradients", "task_jvp", "weighted_gradient"]

# Tasks whose vector-Jacobian products run together: enough to vectorise,
# few enough that 40 tasks do not hold 40 backward passes in memory at once.
_TASKS_PER_MAP = 8


class _Functions:
    """The jitted primitives of one model and one list of variables."""

    def __init__(self, model, plan, variables):
        chosen = {id(v) for v in variables}
        self.variables = list(variables)
        self.others = [
            v for v in model.trainable_variables + model.non_trainable_variables if id(v) not in chosen
        ]
        self.num_tasks = plan.num_tasks

        def losses(values, other_values, batch):
            mapping = list(zip(self.variables, values)) + list(zip(self.others, other_values))
            return objectives.inference_task_losses(model, plan, batch, mapping)

        self.losses = losses
        self.gradients = jax.jit(self._gradients)
        self.hvp = jax.jit(self._hvp)
        self.weighted_gradient = jax.jit(self._weighted_gradient)
        self.jvp = jax.jit(self._jvp)
        self.solvers = {}

    def _gradients(self, values, other_values, batch):
        losses, pullback = jax.vjp(lambda v: self.losses(v, other_values, batch), values)
        cotangents = jnp.eye(self.num_tasks, dtype=losses.dtype)
        grads = jax.lax.map(lambda c: pullback(c)[0], cotangents, batch_size=_TASKS_PER_MAP)
        return losses, grads

    def _weighted_gradient(self, values, other_values, batch, coefficients):
        losses, pullback = jax.vjp(lambda v: self.losses(v, other_values, batch), values)
        return losses, pullback(coefficients.astype(losses.dtype))[0]

    def _jvp(self, values, other_values, batch, vectors):
        return jax.jvp(lambda v: self.losses(v, other_values, batch), (values,), (vectors,))[1]

    def _hvp(self, values, other_values, batch, coefficients, vectors):
        def total_gradient(v):
            total = lambda w: jnp.sum(coefficients * self.losses(w, other_values, batch))
            return jax.grad(total)(v)

        return jax.jvp(total_gradient, (values,), (vectors,))[1]

    def _average_hvp(self, values, other_values, groups, coefficients, vectors):
        """sum_b share_b H_b v: one scan per group of same-shaped batches, so
        the compiled graph holds one Hessian-vector product per group, not
        one per batch."""
        total = [jnp.zeros_like(v) for v in vectors]
        for batches, shares in groups:
            def add(carry, item):
                batch, share = item
                part = self._hvp(values, other_values, batch, coefficients, vectors)
                return [c + share * p for c, p in zip(carry, part, strict=True)], None

            total = jax.lax.scan(add, total, (batches, shares))[0]
        return total

    def solver(self, solve, options):
        """`solve(operator, rhs, **options)` on the averaged Hessian, jitted
        once per solver and options."""
        key = (solve, tuple(sorted(options.items())))
        if key not in self.solvers:
            def run(values, other_values, groups, coefficients, rhs):
                operator = lambda v: self._average_hvp(values, other_values, groups, coefficients, v)
                return solve(operator, rhs, **options)

            self.solvers[key] = jax.jit(run)
        return self.solvers[key]

    def arguments(self):
        return [v.value for v in self.variables], [v.value for v in self.others]


def _functions(model, variables, batch):
    batch = objectives.as_batch(batch)
    plan = model.step_plan_for(tuple(batch))
    key = ("jax_hvp", tuple(id(v) for v in variables))
    # The plan lives as long as the compilation: a recompiled model (new
    # losses) gets new functions.
    return plan._cached(key, lambda: _Functions(model, plan, variables)), batch


def _groups(batches, shares):
    """The batches stacked by shape: [(stacked batches, shares)]."""
    groups = {}
    for batch, share in zip(batches, shares, strict=True):
        leaves, structure = jax.tree_util.tree_flatten(batch)
        key = (structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
        groups.setdefault(key, []).append((batch, share))
    return [
        (jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[b for b, _ in members]),
         jnp.asarray([s for _, s in members], jnp.float32))
        for members in groups.values()
    ]


def hessian_solve(model, variables, batches, shares, coefficients, rhs, solve, **options):
    """`solve(operator, rhs, **options)` with operator(v) = sum_b shares_b
    H_b v, as one jitted function (see `keras_mgda.backend.hessian_solve`).

    Returns:
        What `solve` returns.
    """
    batches = [objectives.as_batch(b) for b in batches]
    functions, _ = _functions(model, variables, batches[0])
    values, other_values = functions.arguments()
    coefficients = jnp.asarray(coefficients, dtype=values[0].dtype)
    rhs = [jnp.asarray(r, dtype=x.dtype) for r, x in zip(rhs, values, strict=True)]
    run = functions.solver(solve, options)
    return run(values, other_values, _groups(batches, shares), coefficients, rhs)


def task_gradients(model, variables, batch):
    """Per-task losses and their gradients with respect to `variables`.

    Args:
        model: a compiled `MultiTaskModel`.
        variables: a list of its trainable variables.
        batch: `(x, y)` or `(x, y, sample_weight)` arrays.

    Returns:
        `(losses, grads)`: losses (T,), and per task a list of gradients
        shaped like `variables` (zeros where a task does not reach one).
    """
    functions, batch = _functions(model, variables, batch)
    values, other_values = functions.arguments()
    losses, stacked = functions.gradients(values, other_values, batch)
    return losses, [[g[t] for g in stacked] for t in range(functions.num_tasks)]


def hessian_vector_product(model, variables, batch, coefficients, vectors):
    """The product of the Hessian of sum_t coefficients_t L_t (with respect
    to `variables`, in inference mode) with `vectors`.

    Args:
        model: a compiled `MultiTaskModel`.
        variables: a list of its trainable variables.
        batch: `(x, y)` or `(x, y, sample_weight)` arrays.
        coefficients: (T,) weights of the task losses.
        vectors: arrays shaped like `variables`.

    Returns:
        A list of arrays shaped like `variables`.
    """
    functions, batch = _functions(model, variables, batch)
    values, other_values = functions.arguments()
    coefficients = jnp.asarray(coefficients, dtype=values[0].dtype)
    vectors = [jnp.asarray(v, dtype=x.dtype) for v, x in zip(vectors, values, strict=True)]
    return list(functions.hvp(values, other_values, batch, coefficients, vectors))


def weighted_gradient(model, variables, batch, coefficients):
    """The task losses (T,) and the gradient of sum_t coefficients_t L_t
    with respect to `variables` (a list shaped like them): J^T c, one
    backward pass."""
    functions, batch = _functions(model, variables, batch)
    values, other_values = functions.arguments()
    coefficients = jnp.asarray(coefficients, dtype=values[0].dtype)
    losses, grads = functions.weighted_gradient(values, other_values, batch, coefficients)
    return losses, list(grads)


def task_jvp(model, variables, batch, vectors):
    """J v: each task loss's directional derivative along `vectors` (T,),
    one forward-mode pass."""
    functions, batch = _functions(model, variables, batch)
    values, other_values = functions.arguments()
    vectors = [jnp.asarray(v, dtype=x.dtype) for v, x in zip(vectors, values, strict=True)]
    return functions.jvp(values, other_values, batch, vectors)
