"""The walk along each direction: safe steps (a direction is taken only if
it lowers the chosen combination of the losses, the damping raised until it
does), the per-point record, and the progress output."""

import collections
import sys
import warnings

import keras
import numpy as np

from keras_mgda import _keras
from keras_mgda.pareto._run import dot
from keras_mgda.pareto._run import norm
from keras_mgda.pareto._run import stationarity

__all__ = ["DAMPING_GROWTH", "Progress", "safe_direction", "trace", "verbosity"]

# Levenberg-Marquardt's factor: the damping is multiplied by it until the
# direction lowers the combination, and divided by it (down to the
# `damping` asked for) after each step that needed more.
DAMPING_GROWTH = 10.0
# The first damping tried above zero, when `damping=0` is not enough.
SMALLEST_RAISED_DAMPING = 1e-3

# A direction the checks accepted: v, |v|, and what the point records.
_Step = collections.namedtuple("_Step", ["v", "v_norm", "damping", "residual", "descent"])


def _where(k, beta, step):
    return f"point (direction {k}, beta={np.round(beta, 4).tolist()}, step {step})"


def safe_direction(run, point, damping):
    """The direction v of MINRES on (H + damping I) v = J^T beta, with the
    damping raised (x DAMPING_GROWTH, up to `max_damping`) until
    cos(v, J^T beta) > `min_descent`, so that x - step v lowers beta^T f to
    first order even where H is indefinite (far from a minimum).

    Returns:
        `(step, None)` with a `_Step`, or `(None, reason)` when no damping
        up to `max_damping` gives a descent direction (or J^T beta = 0).
    """
    options = run.options
    rhs_norm = norm(point.rhs)
    if rhs_norm == 0.0:
        return None, "J^T beta is zero there: beta^T f is stationary, there is nothing to lower along beta"
    while True:
        v, residual = run.solve(point, damping)
        v_norm = norm(v)
        if not np.isfinite(v_norm):
            raise FloatingPointError(f"The Hessian-vector products are not finite at {point.where}; the model's "
                                     "weights are restored.")
        descent = dot(point.rhs, v) / (rhs_norm * v_norm) if v_norm > 0 else 0.0
        if descent > options["min_descent"]:
            return _Step(v, v_norm, damping, residual, descent), None
        if damping >= options["max_damping"]:
            return None, (
                f"no damping up to max_damping={options['max_damping']:g} gave a direction that lowers beta^T f "
                f"(cos(v, J^T beta) = {descent:.3g} at damping {damping:g}, min_descent="
                f"{options['min_descent']:g}); the point is likely far from Pareto-stationary"
            )
        damping = min(max(damping * DAMPING_GROWTH, SMALLEST_RAISED_DAMPING), options["max_damping"])


def _walk(run, plan, k, beta, start, front, progress):
    """Takes the steps along direction k from the start point.

    Returns:
        `(steps taken, message)`: the message says why the direction
        stopped early, None when it did not.
    """
    options = run.options
    point, damping = start, options["damping"]
    for step in range(1, options["steps"] + 1):
        taken, reason = safe_direction(run, point, damping)
        if taken is None:
            return step - 1, f"direction {k} (beta={np.round(beta, 4).tolist()}) stopped before step {step}: {reason}."
        # Levenberg-Marquardt: the next step starts from a lower damping.
        damping = max(options["damping"], taken.damping / DAMPING_GROWTH)
        run.move(taken.v, options["step_size"] / taken.v_norm)
        where = _where(k, beta, step)
        run.resample()
        run.correct(where)
        point = run.point(where, beta)  # the next step's, and this point's stationarity
        losses, metrics = run.evaluate(plan, where)
        diagnostics = {
            "damping": taken.damping, "minres_residual": taken.residual, "descent": taken.descent,
            "stationarity": stationarity(point.gram, point.alpha),
        }
        front.add(losses, metrics, run.model.get_weights(), direction=k, step=step, **diagnostics)
        progress.update(k, step, losses, diagnostics)
    return options["steps"], None


def trace(run, plan, betas, start, front, progress):
    """Walks every direction from the start (the model at its start
    weights), recording each point; warns for each direction that stopped
    early.

    Args:
        run: the `Run`.
        plan: the model's step plan (task names, loss weights).
        betas: (K, T) directions.
        start: the start's `Point` on all the data (reused for every
            direction when the steps average over all of it).
        front: the `ParetoFront` each point is added to.
        progress: a `Progress`.

    Returns:
        `{k: message}` for the directions that stopped early.
    """
    start_weights = run.model.get_weights()
    stopped = {}
    for k, beta in enumerate(betas):
        run.model.set_weights(start_weights)
        where = _where(k, beta, 0)
        if run.sampling:  # each direction draws its own batches
            run.resample()
            point = run.point(where, beta)
        else:  # J^T beta at the start: one backward pass per direction
            point = start._replace(rhs=run.combined(beta)[1], where=where)
        taken, message = _walk(run, plan, k, beta, point, front, progress)
        if message is not None:
            stopped[k] = message
            warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of `explore`
            progress.skip(run.options["steps"] - taken)
    return stopped


def verbosity(verbose):
    """Keras's `verbose="auto"`: a progress bar on a terminal, one line per
    step otherwise (logs stay free of control characters)."""
    if verbose == "auto":
        return 1 if getattr(sys.stdout, "isatty", lambda: False)() else 2
    return int(verbose)


def _print(message):
    _keras.print_message(message)


class Progress:
    """Progress of an exploration: Keras's `Progbar` (verbose 1), one line
    per step (verbose 2), or nothing (0)."""

    def __init__(self, total, verbose, task_names):
        self.verbose = verbosity(verbose)
        self.total = total
        self.done = 0
        self.task_names = list(task_names)
        self.bar = None
        if self.verbose == 1:  # values shown as they are, not averaged over steps
            names = [f"{name}_loss" for name in self.task_names] + ["damping", "stationarity"]
            self.bar = keras.utils.Progbar(total, verbose=1, stateful_metrics=names, unit_name="step")

    def update(self, k, step, losses, diagnostics):
        self.done += 1
        values = [(f"{name}_loss", float(value)) for name, value in zip(self.task_names, losses, strict=True)]
        values += [("damping", diagnostics["damping"]), ("stationarity", diagnostics["stationarity"])]
        if self.bar is not None:
            self.bar.update(self.done, values)
        elif self.verbose == 2:
            shown = " - ".join(f"{name}: {value:.4g}" for name, value in values)
            _print(f"explore {self.done}/{self.total}: direction {k} step {step} - {shown}")

    def skip(self, count):
        """Steps a stopped direction will not take."""
        self.done += count
        if self.bar is not None:
            self.bar.update(self.done)

