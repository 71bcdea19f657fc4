"""What `explore` checks before it changes anything, and the finiteness
checks along the walk: bad input raises an error that says what to pass
instead, before a single weight moves."""

import numbers

import keras
import numpy as np

__all__ = ["check_finite_losses", "check_finite_gram", "check_options", "check_sample_batches",
           "check_weights", "directions_array"]

SOLVERS = ("keras", "scipy")
VERBOSE = ("auto", 0, 1, 2)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_number(options, name):
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")


def check_options(options):
    """Checks `explore`'s settings; raises ValueError naming the bad one.

    Args:
        options: the dict `explore` builds from its keyword arguments.
    """
    if options["solver"] not in SOLVERS:
        raise ValueError(f"Unknown solver={options['solver']!r}; use one of {SOLVERS}.")
    for name in ("step_size", "correction_step_size", "tol"):
        _positive_number(options, name)
    for name, least in (("steps", 1), ("minres_iters", 1), ("correction_steps", 0)):
        if not _is_int(options[name]) or options[name] < least:
            raise ValueError(f"{name} must be an integer >= {least}; got {options[name]!r}.")
    damping, largest = options["damping"], options["max_damping"]
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0 <= damping < np.inf:
        raise ValueError(f"damping must be a finite number >= 0; got {damping!r}.")
    if isinstance(largest, bool) or not isinstance(largest, numbers.Real) or not damping <= largest < np.inf:
        raise ValueError(f"max_damping must be finite and at least damping={damping!r}; got {largest!r}.")
    if not 0 <= options["min_descent"] < 1:
        raise ValueError(f"min_descent is a cosine in [0, 1); got {options['min_descent']!r}.")
    batch_size = options["batch_size"]
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (examples per batch), or None for 1024; "
                         f"got {batch_size!r}.")
    sample = options["sample_batches"]
    if sample is not None and (not _is_int(sample) or sample < 1):
        raise ValueError(f"sample_batches must be None (all the data) or an integer >= 1; got {sample!r}.")
    if options["verbose"] not in VERBOSE or isinstance(options["verbose"], bool):
        raise ValueError(f"verbose must be one of {VERBOSE}; got {options['verbose']!r}.")


def check_sample_batches(sample_batches, num_batches, batch_size):
    """Raises when `sample_batches` asks for more batches than the data has."""
    if sample_batches is not None and sample_batches > num_batches:
        size = "" if batch_size is None else f" of {batch_size}"
        raise ValueError(
            f"sample_batches={sample_batches} but the data has {num_batches} batches{size}: pass "
            f"sample_batches <= {num_batches}, or None to average over all of them."
        )


def directions_array(directions, task_names):
    """`directions` as a (K, T) float32 array, checked.

    Args:
        directions: None (one direction per task) or array-like (K, T).
        task_names: the model's tasks.

    Returns:
        A (K, T) float32 array.
    """
    num_tasks = len(task_names)
    if directions is None:
        return np.eye(num_tasks, dtype=np.float32)
    try:
        array = np.asarray(directions, np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"directions must be a (K, {num_tasks}) array of numbers; got {directions!r}.") from error
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] != num_tasks:
        raise ValueError(
            f"directions must be a 2-D array (K, {num_tasks}), one beta per row over the tasks {task_names}; "
            f"got shape {array.shape}. For a single direction pass [beta]."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"directions must be finite; row(s) {np.flatnonzero(~np.isfinite(array).all(1)).tolist()} "
                         "hold NaN or Inf.")
    zero = np.flatnonzero(~array.any(axis=1))
    if zero.size:
        raise ValueError(f"Row(s) {zero.tolist()} of directions are all zeros and lower nothing: each row is a beta "
                         "with at least one nonzero entry (e.g. a row of the identity, the default).")
    return array.astype(np.float32)


def check_weights(variables):
    """Raises ValueError naming the first variable with NaN or Inf."""
    for variable in variables:
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(variable))):
            raise ValueError(
                f"The variable {variable.path!r} holds NaN or Inf: exploration starts from a trained model with "
                "finite weights (restore a checkpoint from before the divergence)."
            )


def check_finite_losses(losses, task_names, where):
    """Raises FloatingPointError naming the first task whose loss is NaN or Inf."""
    for name, value in zip(task_names, np.asarray(losses, np.float64), strict=True):
        if not np.isfinite(value):
            raise FloatingPointError(
                f"The loss of task {name!r} is {value} at {where}; the model's weights are restored. Check the "
                "data for NaN or Inf and, along a walk, try a smaller step_size."
            )


def check_finite_gram(gram, task_names, where):
    """Raises FloatingPointError naming the first task whose gradient is not
    finite (its squared norm, the Gram matrix's diagonal, is NaN or Inf)."""
    for name, value in zip(task_names, np.diag(gram), strict=True):
        if not np.isfinite(value):
            raise FloatingPointError(
                f"The gradient of task {name!r} is not finite at {where} (squared norm {value}); the model's "
                "weights are restored. Check the data and the losses for NaN or Inf."
            )
    if not np.all(np.isfinite(gram)):
        raise FloatingPointError(f"The task gradients' inner products are not finite at {where}; the model's "
                                 "weights are restored.")
