"""Second-order primitives on PyTorch: per-task gradients and exact
Hessian-vector products with respect to chosen variables.

Both run the model in inference mode and change no variable (see
`keras_mgda.step.objectives`). The Hessian-vector product is
forward-over-reverse, `torch.func.jvp` of `torch.func.grad` of the losses
as a function of the variables' values (mapped in a `keras.StatelessScope`):
about 25% faster than a double backward on the MultiMNIST LeNet on CPU.
Where an operation has no forward-mode rule, it falls back to the double
backward (the gradient of <grad, v> through a `create_graph=True`
backward) for that model and those variables. Neither forms a
(parameters x parameters) or (T x parameters) matrix. Eager torch has
nothing to compile.
"""

import torch

from keras_mgda.step import objectives

__all__ = ["hessian_vector_product", "task_gradients", "task_jvp", "weighted_gradient"]


def _values(variables):
    # Keras's torch variables hold `torch.nn.Parameter`s: differentiating
    # with respect to them is differentiating with respect to the variables.
    return [v.value for v in variables]


def _or_zeros(grads, values):
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, values, strict=True)]


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
    batch = objectives.as_batch(batch)
    plan = model.step_plan_for(tuple(batch))
    values = _values(variables)
    with torch.enable_grad():
        losses = objectives.inference_task_losses(model, plan, batch)
        grads = []
        for t in range(plan.num_tasks):
            last = t == plan.num_tasks - 1
            parts = torch.autograd.grad(losses[t], values, retain_graph=not last, allow_unused=True)
            grads.append(_or_zeros(parts, values))
    return losses.detach(), grads


def _forward_over_reverse(model, plan, variables, batch, coefficients, vectors):
    values = [v.value.detach() for v in variables]

    def total(current):
        losses = objectives.inference_task_losses(model, plan, batch, list(zip(variables, current)))
        return torch.sum(coefficients.to(losses.dtype) * losses)

    return list(torch.func.jvp(torch.func.grad(total), (values,), (vectors,))[1])


def _double_backward(model, plan, variables, batch, coefficients, vectors):
    values = _values(variables)
    with torch.enable_grad():
        losses = objectives.inference_task_losses(model, plan, batch)
        total = torch.sum(coefficients.to(losses.dtype) * losses)
        grads = torch.autograd.grad(total, values, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(grads, vectors, strict=True) if g is not None and g.requires_grad]
        if not pairs:  # the loss is linear (or constant) in every variable
            return [torch.zeros_like(x) for x in values]
        dot = sum(torch.sum(g * v) for g, v in pairs)
        product = torch.autograd.grad(dot, values, allow_unused=True)
    return [p.detach() for p in _or_zeros(product, values)]


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
    batch = objectives.as_batch(batch)
    plan = model.step_plan_for(tuple(batch))
    values = _values(variables)
    coefficients = torch.as_tensor(coefficients, device=values[0].device)
    vectors = [torch.as_tensor(v, dtype=x.dtype, device=x.device) for v, x in zip(vectors, values, strict=True)]
    return _forward_or_reverse(
        plan, variables,
        lambda: _forward_over_reverse(model, plan, variables, batch, coefficients, vectors),
        lambda: _double_backward(model, plan, variables, batch, coefficients, vectors),
    )


def _forward_or_reverse(plan, variables, forward, reverse):
    """`forward()` (forward mode), or `reverse()` (reverse mode only) from
    the first time an operation of this model has no forward-mode rule:
    the reverse path needs none (an error of the model itself raises again
    there)."""
    state = plan._cached(("torch_hvp", tuple(id(v) for v in variables)), dict)
    if not state.get("reverse_only"):
        try:
            return forward()
        except (RuntimeError, NotImplementedError):
            state["reverse_only"] = True
    return reverse()


def weighted_gradient(model, variables, batch, coefficients):
    """The task losses (T,) and the gradient of sum_t coefficients_t L_t
    with respect to `variables` (a list shaped like them): J^T c, one
    backward pass."""
    batch = objectives.as_batch(batch)
    plan = model.step_plan_for(tuple(batch))
    values = _values(variables)
    with torch.enable_grad():
        losses = objectives.inference_task_losses(model, plan, batch)
        coefficients = torch.as_tensor(coefficients, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(torch.sum(coefficients * losses), values, allow_unused=True)
    return losses.detach(), _or_zeros(grads, values)


def task_jvp(model, variables, batch, vectors):
    """J v: each task loss's directional derivative along `vectors` (T,),
    by forward mode (or, where an operation has none, the transpose of a
    vector-Jacobian product: d/du <J^T u, v>)."""
    batch = objectives.as_batch(batch)
    plan = model.step_plan_for(tuple(batch))
    values = _values(variables)
    vectors = [torch.as_tensor(v, dtype=x.dtype, device=x.device) for v, x in zip(vectors, values, strict=True)]
    return _forward_or_reverse(
        plan, variables,
        lambda: _forward_jvp(model, plan, variables, batch, vectors),
        lambda: _transposed_vjp(model, plan, values, batch, vectors),
    )


def _forward_jvp(model, plan, variables, batch, vectors):
    values = [v.value.detach() for v in variables]

    def losses(current):
        return objectives.inference_task_losses(model, plan, batch, list(zip(variables, current)))

    return torch.func.jvp(losses, (values,), (vectors,))[1].detach()


def _transposed_vjp(model, plan, values, batch, vectors):
    with torch.enable_grad():
        losses = objectives.inference_task_losses(model, plan, batch)
        u = torch.zeros_like(losses, requires_grad=True)
        grads = torch.autograd.grad(losses, values, grad_outputs=u, create_graph=True, allow_unused=True)
        dot = sum(torch.sum(g * v) for g, v in zip(grads, vectors, strict=True) if g is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:
            return torch.zeros_like(losses).detach()
        return torch.autograd.grad(dot, u)[0].detach()
