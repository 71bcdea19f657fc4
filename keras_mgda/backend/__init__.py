"""What differs between the Keras backends, one module each: how to
differentiate, how a compiled step applies or skips, how replicas agree.

Nothing else in keras_mgda imports tensorflow, jax or torch.
"""

import keras

__all__ = [
    "PACKED_RESULTS",
    "averaged_hvp",
    "batch_average",
    "build_before_tracing",
    "distributed_step_function",
    "hessian_solve",
    "hessian_vector_product",
    "named_results",
    "prepare_plan",
    "task_gradients",
    "task_jvp",
    "train_step",
    "weighted_gradient",
    "wrap_train_function",
]


def _impl():
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_mgda.backend import tensorflow as impl
    elif name == "jax":
        from keras_mgda.backend import jax as impl
    elif name == "torch":
        from keras_mgda.backend import torch as impl
    else:
        raise NotImplementedError(
            f"keras_mgda does not support the {name!r} backend; use "
            "tensorflow, jax or torch (set KERAS_BACKEND)."
        )
    return impl


def train_step(model, *args, **kwargs):
    """Runs `model`'s multi-task train step on the active Keras backend."""
    return _impl().train_step(model, *args, **kwargs)


def wrap_train_function(model, train_function):
    """Lets a backend check each call of Keras's train function: a compiled
    step records a non-finite step and the wrapper raises; an error that
    escapes a step leaves the model's state as it was before that step."""
    return _impl().wrap_train_function(model, train_function)


def build_before_tracing(model, iterator=None, data_batch=None):
    """Lets a backend whose trainer builds the model's losses and optimizer
    lazily, inside the first traced step (TensorFlow without a distribution
    strategy), or from a batch reduced across replicas (TensorFlow with
    one), build them eagerly from the data's shapes instead.

    Returns:
        True when built, False to leave it to Keras.
    """
    build = getattr(_impl(), "build_before_tracing", None)
    return False if build is None else build(model, iterator, data_batch)


def distributed_step_function(model, step_function):
    """Lets a backend adapt the step function its trainer distributes
    (TensorFlow across workers); the step function itself elsewhere."""
    adapt = getattr(_impl(), "distributed_step_function", None)
    return step_function if adapt is None else adapt(model, step_function)


def prepare_plan(plan, model):
    """Lets a backend prepare what it keeps for a new `StepPlan` (called
    once per compilation, after the weighting is built, in the context the
    model is built in: under its distribution strategy's scope on TF)."""
    prepare = getattr(_impl(), "prepare_plan", None)
    if prepare is not None:
        prepare(plan, model)


# The log key of a result vector a backend splits by name only after the
# step (`named_results`); `evaluate` drops it with the names.
PACKED_RESULTS = "_keras_mgda_packed_results"


def named_results(names, vector, packed=False):
    """A metric result vector as `{name: entry}`, as `keras.ops.unstack`
    gives the entries, but split on the host where a backend would compile
    a program per entry (eager JAX: about 12 ms each, 1 s per epoch end at
    T=40). With `packed`, a backend may return `{PACKED_RESULTS: vector}`
    from inside a compiled step (JAX: T slices are T kernels to compile)
    and split it after the step in `wrap_train_function`."""
    named = getattr(_impl(), "named_results", None)
    if named is None:
        return dict(zip(names, keras.ops.unstack(vector, num=len(names)), strict=True))
    return named(names, vector, packed)


def task_gradients(model, variables, batch):
    """Per-task losses (T,) of `batch` and their gradients with respect to
    `variables` (a list per task, shaped like `variables`), in inference
    mode, changing no variable or metric."""
    return _impl_hvp().task_gradients(model, variables, batch)


def weighted_gradient(model, variables, batch, coefficients):
    """Per-task losses (T,) of `batch` and the gradient of sum_t
    coefficients_t L_t with respect to `variables` (J^T c, one backward
    pass), in inference mode, changing no variable or metric."""
    return _impl_hvp().weighted_gradient(model, variables, batch, coefficients)


def task_jvp(model, variables, batch, vectors):
    """J v: the (T,) directional derivatives of the task losses of `batch`
    along `vectors` (a list shaped like `variables`), one forward-mode
    pass, in inference mode, changing no variable or metric."""
    return _impl_hvp().task_jvp(model, variables, batch, vectors)


def hessian_vector_product(model, variables, batch, coefficients, vectors):
    """The exact product of the Hessian of sum_t coefficients_t L_t (with
    respect to `variables`, in inference mode) with `vectors`, a list shaped
    like `variables`; changes no variable or metric."""
    return _impl_hvp().hessian_vector_product(model, variables, batch, coefficients, vectors)


def hessian_solve(model, variables, batches, shares, coefficients, rhs, solve, **options):
    """`solve(operator, rhs, **options)` for the full-data Hessian operator
    v -> sum_b shares_b H_b v, H_b the Hessian of sum_t coefficients_t L_t
    on `batches[b]`. JAX compiles the whole solve into one function (its
    `ops.while_loop` would otherwise be traced and compiled again at every
    call); elsewhere the solver's loop runs eagerly around compiled
    Hessian-vector products.

    Returns:
        What `solve` returns.
    """
    impl = _impl_hvp()
    if hasattr(impl, "hessian_solve"):
        return impl.hessian_solve(model, variables, batches, shares, coefficients, rhs, solve, **options)
    return solve(averaged_hvp(model, variables, batches, shares, coefficients), rhs, **options)


def averaged_hvp(model, variables, batches, shares, coefficients):
    """The operator v -> sum_b shares_b H_b v (see `hessian_solve`), as a
    plain function of a list shaped like `variables`: for solvers that run
    outside the backend's compiled code (SciPy's MINRES).

    Returns:
        A function of `vectors` returning a list shaped like `variables`.
    """
    impl = _impl_hvp()

    def operator(vectors):
        return batch_average(impl.hessian_vector_product, model, variables, batches, shares, coefficients, vectors)

    return operator


def batch_average(primitive, model, variables, batches, shares, *args):
    """sum_b shares_b primitive(model, variables, batch_b, *args), any
    structure of tensors, one batch's result alive at a time (O(parameters)
    memory however many batches)."""
    total = None
    for batch, share in zip(batches, shares, strict=True):
        part = primitive(model, variables, batch, *args)
        part = keras.tree.map_structure(lambda p, share=share: share * p, part)
        total = part if total is None else keras.tree.map_structure(lambda a, b: a + b, total, part)
    return total


def _impl_hvp():
    # Separate modules from the train steps: the second-order primitives
    # import nothing the steps need, and the steps nothing of theirs.
    name = keras.backend.backend()
    _impl()  # the same error for an unsupported backend
    if name == "tensorflow":
        from keras_mgda.backend import tensorflow_hvp as impl
    elif name == "jax":
        from keras_mgda.backend import jax_hvp as impl
    else:
        from keras_mgda.backend import torch_hvp as impl
    return impl
