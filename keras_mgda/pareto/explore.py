"""Continuous Pareto exploration (Ma, Du & Matusik, "Efficient Continuous
Pareto Exploration in Multi-Task Learning", ICML 2020).

At a Pareto-stationary point x with MGDA weights alpha (sum_i alpha_i
grad f_i(x) = 0), differentiating that condition along a curve of such
points gives H dx = -J^T d(alpha), with H = sum_i alpha_i hess f_i and J the
task gradients. Solving

    (H + damping I) v = J^T beta

and stepping x <- x - step_size * v / ||v|| moves along the Pareto set to
first order with d(alpha) = beta: for beta = e_i, task i's loss changes by
-(J H^-1 J^T)_ii < 0 per unit step, so it goes down. H is never formed:
MINRES runs on exact Hessian-vector products (`keras_mgda.backend`). As in
the authors' code (`pareto/optim/kkt_solver.py`): full-data gradients, the
min-norm alpha of the raw gradients, v normalised, damping 0.1, at most 50
MINRES iterations, tolerance 1e-5, step size 0.1, 10 steps per direction.
Unlike it, the Hessian-vector products are full-data averages too by
default (theirs use one mini-batch of 2048 per solve; `sample_batches`
draws a fresh sample per step as they do), MINRES starts from 0 (theirs from
-mean_i grad f_i), and optional correction steps (plain MGDA steps, the
paper's Section 4.2) pull each new point back towards the Pareto set.
"""

import collections
import time

import keras
import numpy as np

from keras_mgda import backend as mtl_backend
from keras_mgda import solvers
from keras_mgda.backend import numpy_ops
from keras_mgda.pareto import _data
from keras_mgda.pareto.front import ParetoFront
from keras_mgda.pareto.minres import minres
from keras_mgda.pareto.scipy_minres import scipy_minres

__all__ = ["DEFAULT_SOLVER", "SOLVERS", "explore"]

SOLVERS = ("keras", "scipy")
# The faster of the two on CPU (benchmarks/pareto_solvers.py, docs/pareto.md).
DEFAULT_SOLVER = "keras"
TRAINABLE = ("all", "shared")


# One point of the walk: losses (T,), Gram matrix (T, T), J^T beta.
_Point = collections.namedtuple("_Point", ["losses", "gram", "rhs"])


class _Run:
    """One exploration: the model, what moves, the data, and the costs."""

    def __init__(self, model, variables, data, options):
        self.model = model
        self.variables = variables
        self.data = data
        self.options = options
        self.num_tasks = len(model.step_plan.task_names)
        self.cost = {
            "gradient_passes": 0, "jvp_passes": 0, "hvp_passes": 0, "evaluation_passes": 0,
            "minres_iterations": [], "examples": data.count, "seconds": 0.0,
        }
        self._rng = np.random.default_rng(options["seed"])
        self._use(range(len(data.batches)))

    @property
    def sampling(self):
        """Whether each step draws its own batches."""
        count = self.options["sample_batches"]
        return count is not None and count < len(self.data.batches)

    def resample(self):
        """With `sample_batches`, a fresh draw (without replacement) of the
        batches the next averages run over; otherwise they stay all."""
        if self.sampling:
            count = len(self.data.batches)
            self._use(sorted(self._rng.choice(count, self.options["sample_batches"], replace=False)))

    def _use(self, chosen):
        """Averages over the batches at positions `chosen`, each weighted by
        its share of their examples."""
        sizes = [self.data.sizes[i] for i in chosen]
        total = sum(sizes)
        self.batches = [self.data.batches[i] for i in chosen]
        self.shares = [size / total for size in sizes]
        self.cost["examples_per_pass"] = total

    def _average(self, primitive, *args):
        """The average of a per-batch primitive's result over the batches."""
        return mtl_backend.batch_average(primitive, self.model, self.variables, self.batches, self.shares, *args)

    def combined(self, coefficients):
        """Losses (T,) and J^T coefficients over the current batches, one
        backward pass."""
        coefficients = np.asarray(coefficients, np.float32)
        losses, grads = self._average(mtl_backend.weighted_gradient, coefficients)
        self.cost["gradient_passes"] += 1
        return np.asarray(keras.ops.convert_to_numpy(losses), np.float64), list(grads)

    def point(self, beta=None):
        """Task losses, the Gram matrix J J^T and (for a given
        beta) J^T beta, holding at most two parameter-sized vectors: column
        t of the Gram matrix is J g_t, one forward-mode pass along g_t, so
        no (T x parameters) matrix is formed."""
        num_tasks = self.num_tasks
        gram = np.zeros((num_tasks, num_tasks))
        rhs = None
        for t in range(num_tasks):
            losses, g_t = self.combined(np.eye(num_tasks)[t])
            gram[:, t] = keras.ops.convert_to_numpy(self._average(mtl_backend.task_jvp, g_t))
            self.cost["jvp_passes"] += 1
            if beta is not None and beta[t] != 0:
                part = [float(beta[t]) * g for g in g_t]
                rhs = part if rhs is None else [r + p for r, p in zip(rhs, part, strict=True)]
        if beta is not None and rhs is None:
            rhs = [keras.ops.zeros_like(g) for g in g_t]
        return _Point(losses, (gram + gram.T) / 2, rhs)

    def direction(self, point):
        """MINRES's solution v of (H + damping I) v = J^T beta at this point."""
        # The raw gradients' min-norm weights, as in the KKT condition the
        # exploration follows (no normalisation).
        alpha = np.asarray(solvers.min_norm(point.gram, ops=numpy_ops), np.float32)
        options = self.options
        settings = dict(damping=options["damping"], max_iters=options["minres_iters"], tol=options["tol"])
        system = (self.model, self.variables, self.batches, self.shares, alpha)
        if options["solver"] == "scipy":
            v, iterations, _ = scipy_minres(mtl_backend.averaged_hvp(*system), point.rhs, **settings)
        else:
            v, iterations, _ = mtl_backend.hessian_solve(*system, point.rhs, minres, **settings)
        iterations = int(keras.ops.convert_to_numpy(iterations))
        self.cost["minres_iterations"].append(iterations)
        self.cost["hvp_passes"] += iterations
        return v

    def move(self, vectors, scale):
        """x <- x - scale * vectors."""
        for variable, vector in zip(self.variables, vectors, strict=True):
            variable.assign(variable - keras.ops.cast(scale, variable.dtype) * keras.ops.cast(vector, variable.dtype))

    def correct(self):
        """MGDA steps back towards the Pareto set: x <- x - lr * J^T alpha."""
        lr = self.options["correction_step_size"]
        for _ in range(self.options["correction_steps"]):
            alpha = solvers.min_norm(self.point().gram, ops=numpy_ops)
            self.move(self.combined(alpha)[1], lr)

    def evaluate(self, plan):
        """The point's task losses (with `loss_weights`) and `evaluate`'s
        metrics, on the exploration's data."""
        x, y, batch_size = self.data.source
        metrics = self.model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        self.cost["evaluation_passes"] += 1
        losses = [metrics[f"{name}_loss"] * w for name, w in zip(plan.task_names, plan.loss_weights, strict=True)]
        return np.asarray(losses, np.float64), {k: float(v) for k, v in metrics.items()}


def _norm(vectors):
    return float(np.sqrt(sum(float(keras.ops.sum(v * v)) for v in vectors)))


def _variables(model, trainable):
    if trainable == "all":
        return list(model.trainable_variables)
    if trainable == "shared":
        if model.encoder is None:
            raise ValueError("trainable='shared' needs a model with a shared representation (several outputs).")
        return list(model.encoder.trainable_variables)
    raise ValueError(f"Unknown trainable={trainable!r}; use one of {TRAINABLE}.")


def _directions(directions, num_tasks):
    if directions is None:
        return np.eye(num_tasks, dtype=np.float32)
    directions = np.atleast_2d(np.asarray(directions, np.float32))
    if directions.shape[1] != num_tasks:
        raise ValueError(f"directions must be (K, {num_tasks}), one beta per row; got shape {directions.shape}.")
    return directions


def _check(model, plan, options):
    if plan.num_tasks < 2:
        raise ValueError("Pareto exploration needs at least two tasks (outputs compiled with a loss).")
    if options["solver"] not in SOLVERS:
        raise ValueError(f"Unknown solver={options['solver']!r}; use one of {SOLVERS}.")
    for name in ("step_size", "correction_step_size", "tol"):
        if not options[name] > 0:
            raise ValueError(f"{name} must be positive; got {options[name]!r}.")
    if options["damping"] < 0 or options["minres_iters"] < 1 or options["steps"] < 1:
        raise ValueError("damping must be >= 0, and minres_iters and steps >= 1.")
    if options["sample_batches"] is not None and options["sample_batches"] < 1:
        raise ValueError(f"sample_batches must be None (all the data) or >= 1; got {options['sample_batches']}.")


def _walk(run, plan, beta, start, on_point):
    """Takes the steps along one direction from the start point."""
    options = run.options
    point = start
    for step in range(options["steps"]):
        v = run.direction(point)
        norm = _norm(v)
        if not np.isfinite(norm) or norm == 0.0:
            raise FloatingPointError(
                f"The exploration direction is {'zero' if norm == 0 else 'not finite'} at step {step} of "
                f"beta={beta.tolist()}; raise `damping` or check the losses."
            )
        run.move(v, options["step_size"] / norm)
        run.resample()
        run.correct()
        if step + 1 < options["steps"]:  # the last point needs no gradients
            point = run.point(beta)
        on_point(step + 1, *run.evaluate(plan))


def _trace(run, plan, betas, front, start_weights, verbose):
    """Walks every direction from the start, adding each point to `front`;
    leaves the model at the start, also when a step fails."""
    model = run.model
    # Without sampling the start's Gram matrix serves every direction;
    # with it, each direction draws its own batches and computes its own.
    start = None if run.sampling else run.point()
    bar = keras.utils.Progbar(len(betas) * run.options["steps"], verbose=0 if verbose == 0 else 1, unit_name="step")
    try:
        for k, beta in enumerate(betas):
            model.set_weights(start_weights)

            def on_point(step, losses, metrics, k=k):
                front.add(losses, metrics, model.get_weights(), direction=k, step=step)
                bar.add(1, [(f"{name}_loss", value) for name, value in zip(plan.task_names, losses)])

            if start is None:
                run.resample()
                point = run.point(beta)
            else:  # J^T beta at the start: one backward pass per direction.
                point = start._replace(rhs=run.combined(beta)[1])
            _walk(run, plan, beta, point, on_point)
    finally:
        model.set_weights(start_weights)


def explore(
    model, x, y=None, *, directions=None, steps=10, step_size=0.1, correction_steps=0,
    correction_step_size=None, minres_iters=50, tol=1e-5, damping=0.1, batch_size=None,
    trainable="all", solver=DEFAULT_SOLVER, sample_batches=None, seed=None, verbose="auto",
):
    """Traces the Pareto set of a trained multi-task model from its point.

    Per direction beta, `steps` times: task gradients J (averaged over all
    the data, or over a fresh sample of `sample_batches` batches), their
    min-norm weights alpha, MINRES on (H + damping I) v = J^T beta with H
    the Hessian of sum_i alpha_i f_i, the step x <- x - step_size v / |v|
    (beta = e_i lowers task i), then `correction_steps` MGDA steps. All in
    inference mode, on the compiled task losses with their `loss_weights`;
    the model is left at its starting weights.

    Args:
        model: a compiled `keras_mgda.MultiTaskModel` with at least 2 tasks.
        x: the data, as for `fit`: arrays (with `y`), or a batched
            `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`.
        y: the targets, with array `x`.
        directions: (K, T) array, one beta per row; default one per task
            (the rows of the identity).
        steps: steps per direction (10, as the authors).
        step_size: length of each step in weight space (0.1).
        correction_steps: MGDA steps after each exploration step (0).
        correction_step_size: learning rate of those steps (`step_size`).
        minres_iters: MINRES iterations per solve, at most (50).
        tol: MINRES's relative residual tolerance (1e-5).
        damping: added to H's diagonal (0.1): H is singular or indefinite
            in most directions of a network's weight space.
        batch_size: batch size for arrays (default 1024).
        trainable: `"all"` (every trainable weight moves) or `"shared"`
            (only the encoder's, up to Z; the heads stay fixed).
        solver: `"keras"` (MINRES in `keras.ops`, the default: faster on
            CPU, see docs/pareto.md) or `"scipy"` (SciPy's MINRES on the host).
        sample_batches: if set, each step's gradients, Hessian-vector
            products and corrections average over this many batches drawn
            afresh (as the authors' code draws a mini-batch per step), not
            over all the data; points are still scored on all of it.
        seed: the seed of those draws.
        verbose: 0 silences the progress bar; `"auto"` or 1 shows it.

    Returns:
        A `ParetoFront`: point 0 is the start, then `steps` points per
        direction in order.

    Example:

    ```python
    model.fit(x_train, y_train, epochs=10)  # an MGDAModel
    front = keras_mgda.pareto.explore(model, x_val, y_val, steps=5)
    front.restore(3)  # the model at point 3; front.losses is (1 + 5 K, T)
    ```
    """
    started = time.perf_counter()
    data = _data.as_data(x, y, batch_size)
    plan = model.step_plan_for(tuple(data.batches[0]))
    options = _options(
        steps=steps, step_size=step_size, correction_steps=correction_steps,
        correction_step_size=correction_step_size, minres_iters=minres_iters, tol=tol, damping=damping,
        solver=solver, sample_batches=sample_batches, seed=seed,
    )
    _check(model, plan, options)
    betas = _directions(directions, plan.num_tasks)
    run = _Run(model, _variables(model, trainable), data, options)
    start_weights = model.get_weights()
    front = ParetoFront(plan.task_names, betas, model=model)
    front.add(*run.evaluate(plan), start_weights, direction=-1, step=0)
    _trace(run, plan, betas, front, start_weights, verbose)
    run.cost["seconds"] = time.perf_counter() - started
    front.cost = run.cost
    return front


def _options(**options):
    """explore's settings, with counts as ints and the defaults that depend
    on other settings filled in."""
    for name in ("steps", "correction_steps", "minres_iters"):
        options[name] = int(options[name])
    if options["correction_step_size"] is None:
        options["correction_step_size"] = options["step_size"]
    if options["sample_batches"] is not None:
        options["sample_batches"] = int(options["sample_batches"])
    return options
