"""Continuous Pareto exploration (Ma, Du & Matusik, "Efficient Continuous
Pareto Exploration in Multi-Task Learning", ICML 2020).

At a Pareto-stationary point x with MGDA weights alpha (sum_i alpha_i
grad f_i(x) = 0), differentiating that condition along a curve of such
points gives H dx = -J^T d(alpha), with H = sum_i alpha_i hess f_i and J the
task gradients. Solving

    (H + damping I) v = J^T beta

and stepping x <- x - step_size * v / ||v|| moves along the Pareto set to
first order with d(alpha) = beta, and lowers beta^T f when H + damping I is
positive definite: then <J^T beta, v> > 0. Away from a minimum H is
indefinite, and v can point uphill; so every step checks
cos(v, J^T beta) > `min_descent` first and, where it fails, raises the
damping Levenberg-Marquardt style (x10, up to `max_damping`: v tends to
J^T beta, the steepest descent of beta^T f) until it holds, or stops that
direction with a warning. H is never formed: MINRES runs on exact
Hessian-vector products (`keras_mgda.backend`).

As in the authors' code (`pareto/optim/kkt_solver.py`): the min-norm alpha
of the raw gradients, v normalised, damping 0.1, at most 50 MINRES
iterations, tolerance 1e-5, step size 0.1, 10 steps per direction. Unlike
it, gradients and Hessian-vector products are averages over all the data
by default (theirs: gradients over a quarter of the training set with
momentum, Hessian-vector products on one mini-batch of 2048;
`sample_batches` draws a fresh sample per step), MINRES starts from 0
(theirs from the mean gradient), and optional correction steps (plain MGDA
steps, the paper's Section 4.2) pull each new point back towards the
Pareto set.
"""

import time
import warnings

import keras
import numpy as np

from keras_mgda.pareto import _checks
from keras_mgda.pareto import _data
from keras_mgda.pareto import _walk
from keras_mgda.pareto._run import Run
from keras_mgda.pareto._run import stationarity
from keras_mgda.pareto.front import ParetoFront

__all__ = ["DEFAULT_SOLVER", "SOLVERS", "START_STATIONARITY_WARNING", "explore", "stationarity_of"]

SOLVERS = _checks.SOLVERS
# The faster of the two on CPU (benchmarks/pareto_solvers.py, docs/pareto.md).
DEFAULT_SOLVER = "keras"
TRAINABLE = ("all", "shared")
# Above this |sum_t alpha_t g_t| / max_t |g_t| at the start, `explore`
# warns that the start is not near Pareto-stationary (docs/pareto.md: the
# MultiMNIST measurements behind it).
START_STATIONARITY_WARNING = 0.1


def _variables(model, trainable):
    if trainable == "all":
        return list(model.trainable_variables)
    if trainable == "shared":
        if model.encoder is None:
            raise ValueError("trainable='shared' needs a model with a shared representation (several outputs).")
        return list(model.encoder.trainable_variables)
    raise ValueError(f"Unknown trainable={trainable!r}; use one of {TRAINABLE}.")


def _check_start(start_point, options):
    """The start's stationarity; warns above START_STATIONARITY_WARNING."""
    measure = stationarity(start_point.gram, start_point.alpha)
    if measure > START_STATIONARITY_WARNING:
        advice = "train the model further"
        if options["correction_steps"] == 0:
            advice += ", or pass correction_steps=1 or more (MGDA steps towards the front after each step)"
        warnings.warn(
            f"The start is not near Pareto-stationary: |sum_t alpha_t g_t| / max_t |g_t| = {measure:.3g} > "
            f"{START_STATIONARITY_WARNING} (0 on the Pareto set). Exploration follows the Pareto set from a point "
            "on it; from here its steps also keep training the model, so both losses can fall along every "
            f"direction and only points where one loss rises are trade-offs. To start nearer the front, {advice}.",
            RuntimeWarning, stacklevel=4,  # the caller of `explore`
        )
    return measure


def _snapshot(model):
    """Every variable of the model, its metrics and its optimizer, by
    identity, with a copy of its value."""
    variables = list(model.variables) + list(model.metrics_variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    unique = {id(v): v for v in variables}
    # A copy: on torch the NumPy view of a CPU tensor shares its memory.
    return [(v, np.array(keras.ops.convert_to_numpy(v), copy=True)) for v in unique.values()]


def _restore(snapshot):
    for variable, value in snapshot:
        variable.assign(value)


def explore(
    model, x, y=None, *, directions=None, steps=10, step_size=0.1, correction_steps=0,
    correction_step_size=None, minres_iters=50, tol=1e-5, damping=0.1, max_damping=1e4, min_descent=1e-3,
    batch_size=None, trainable="all", solver=DEFAULT_SOLVER, sample_batches=None, seed=None, verbose="auto",
):
    """Traces the Pareto set of a trained multi-task model from its point.

    Per direction beta, `steps` times: task gradients J (averaged over all
    the data, or over a fresh sample of `sample_batches` batches), their
    min-norm weights alpha, MINRES on (H + damping I) v = J^T beta with H
    the Hessian of sum_i alpha_i f_i, a check that v lowers beta^T f (the
    damping raised until it does), the step x <- x - step_size v / |v|,
    then `correction_steps` MGDA steps. All in inference mode, on the
    compiled task losses with their `loss_weights`. Every variable of the
    model (weights, metrics, optimizer) is left as it was, also when an
    error is raised.

    Args:
        model: a compiled `keras_mgda.MultiTaskModel` with at least 2 tasks,
            trained to (near) Pareto stationarity: a warning says when the
            start is not (see `START_STATIONARITY_WARNING`).
        x: the data, as for `fit`: arrays (with `y`), or a batched
            `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`.
        y: the targets, with array `x`.
        directions: (K, T) array, one beta per row (finite, not all zero);
            default one per task (the rows of the identity).
        steps: steps per direction (10, as the authors).
        step_size: length of each step in weight space (0.1).
        correction_steps: MGDA steps after each exploration step (0).
        correction_step_size: learning rate of those steps (`step_size`).
        minres_iters: MINRES iterations per solve, at most (50).
        tol: MINRES's relative residual tolerance (1e-5).
        damping: added to H's diagonal (0.1): H is singular or indefinite
            in most directions of a network's weight space.
        max_damping: the largest damping a step may raise it to (1e4)
            before its direction is stopped with a warning.
        min_descent: a direction is taken when cos(v, J^T beta) exceeds it
            (1e-3).
        batch_size: batch size for arrays (default 1024); None with a
            `tf.data.Dataset`, which keeps its own batches.
        trainable: `"all"` (every trainable weight moves) or `"shared"`
            (only the encoder's, up to Z; the heads stay fixed).
        solver: `"keras"` (MINRES in `keras.ops`, the default: faster on
            CPU, see docs/pareto.md) or `"scipy"` (SciPy's MINRES on the host).
        sample_batches: if set (at most the number of batches), each step's
            gradients, Hessian-vector products and corrections average over
            this many batches drawn afresh (as the authors' code draws a
            mini-batch per step); points are still scored on all the data.
        seed: the seed of those draws.
        verbose: 0 (silent), 1 (Keras's progress bar), 2 (one line per
            step) or `"auto"` (1 on a terminal, else 2), as Keras's `fit`.

    Returns:
        A `ParetoFront`: point 0 is the start, then up to `steps` points per
        direction in order, each with its damping, MINRES residual, descent
        cosine and stationarity; `front.stopped` says which directions
        stopped early and why.

    Example:

    ```python
    model.fit(x_train, y_train, epochs=100)  # an MGDAModel, trained to convergence
    front = keras_mgda.pareto.explore(model, x_val, y_val, steps=5)
    front.restore(3)  # the model at point 3; front.losses is (1 + 5 K, T)
    ```
    """
    started = time.perf_counter()
    options = _options(
        steps=steps, step_size=step_size, correction_steps=correction_steps, correction_step_size=correction_step_size,
        minres_iters=minres_iters, tol=tol, damping=damping, max_damping=max_damping, min_descent=min_descent,
        batch_size=batch_size, solver=solver, sample_batches=sample_batches, seed=seed, verbose=verbose,
    )
    data, plan, betas, variables = _checked_inputs(model, x, y, directions, trainable, options)
    snapshot = _snapshot(model)
    try:
        front = _explore(model, data, plan, betas, variables, options)
    finally:
        _restore(snapshot)
    front.cost["seconds"] = time.perf_counter() - started
    return front


def _checked_inputs(model, x, y, directions, trainable, options):
    """explore's arguments checked before anything runs: the data, the
    model's step plan, the directions and the variables that move."""
    _checks.check_options(options)
    batch_size = options["batch_size"]
    if hasattr(x, "as_numpy_iterator") and batch_size is not None:
        raise ValueError("batch_size applies to arrays; a tf.data.Dataset keeps its own batches: pass batch_size=None.")
    data = _data.as_data(x, y, batch_size)
    _checks.check_sample_batches(options["sample_batches"], len(data.batches), batch_size)
    plan = model.step_plan_for(tuple(data.batches[0]))
    if plan.num_tasks < 2:
        raise ValueError("Pareto exploration needs at least two tasks (outputs compiled with a loss).")
    betas = _checks.directions_array(directions, plan.task_names)
    variables = _variables(model, trainable)
    _checks.check_weights(variables)
    return data, plan, betas, variables


def _explore(model, data, plan, betas, variables, options):
    """The exploration proper, on checked arguments."""
    run = Run(model, variables, data, plan.task_names, options)
    front = ParetoFront(plan.task_names, betas, model=model)
    where = "the start (point 0)"
    losses, metrics = run.evaluate(plan, where)
    # The start's stationarity on all the data, also when steps sample.
    start = run.point(where)
    measure = _check_start(start, options)
    front.add(losses, metrics, model.get_weights(), direction=-1, step=0, stationarity=measure)
    progress = _walk.Progress(len(betas) * options["steps"], options["verbose"], plan.task_names)
    front.stopped = _walk.trace(run, plan, betas, start, front, progress)
    front.cost = run.cost
    return front


def stationarity_of(model, x, y=None, *, batch_size=None, trainable="all"):
    """How far a model is from Pareto stationarity on some data, as
    `explore` measures its start: |sum_t alpha_t g_t| / max_t |g_t|, with
    g_t the task gradients averaged over all of `x` and alpha their
    min-norm weights (0 on the Pareto set, 1 when the gradients do not
    conflict at all). Changes no variable.

    Args:
        model: a compiled `keras_mgda.MultiTaskModel` with at least 2 tasks.
        x: the data, as for `explore`.
        y: the targets, with array `x`.
        batch_size: batch size for arrays (default 1024).
        trainable: `"all"` or `"shared"`, as for `explore`.

    Returns:
        A float.

    Example:

    ```python
    if keras_mgda.pareto.stationarity_of(model, x, y) > keras_mgda.pareto.START_STATIONARITY_WARNING:
        model.fit(x, y, epochs=10)  # train further before exploring
    ```
    """
    options = _options(**_DEFAULTS, batch_size=batch_size)
    _checks.check_options(options)
    data = _data.as_data(x, y, batch_size)
    plan = model.step_plan_for(tuple(data.batches[0]))
    if plan.num_tasks < 2:
        raise ValueError("Pareto stationarity needs at least two tasks (outputs compiled with a loss).")
    run = Run(model, _variables(model, trainable), data, plan.task_names, options)
    point = run.point("the data passed")
    return stationarity(point.gram, point.alpha)


# explore's settings that `stationarity_of` does not use, at their defaults.
_DEFAULTS = dict(
    steps=10, step_size=0.1, correction_steps=0, correction_step_size=None, minres_iters=50, tol=1e-5,
    damping=0.1, max_damping=1e4, min_descent=1e-3, solver=DEFAULT_SOLVER, sample_batches=None, seed=None,
    verbose=0,
)


def _options(**options):
    """explore's settings, with the defaults that depend on other settings
    filled in."""
    if options["correction_step_size"] is None:
        options["correction_step_size"] = options["step_size"]
    return options
