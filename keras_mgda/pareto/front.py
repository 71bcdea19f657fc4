"""`ParetoFront`: the points an exploration visited, their losses, metrics
and weights, with the means to go back to any of them."""

import json

import numpy as np

from keras_mgda.pareto.hypervolume import pareto_mask

__all__ = ["DIAGNOSTICS", "ParetoFront"]

# What each point records about the step that reached it (NaN for the
# start; `stationarity` is the point's own).
DIAGNOSTICS = ("damping", "minres_residual", "descent", "stationarity")


class ParetoFront:
    """The points of a continuous Pareto exploration.

    Point 0 is the start; every other point belongs to one direction (row
    of `directions`) and one step along it. A point's neighbours on the
    front are the previous and next steps of its direction (the start for
    step 1); joined linearly (`interpolate`) they give a continuous local
    Pareto set.

    Attributes:
        task_names: the tasks, in order.
        directions: (K, T) the betas explored.
        losses: (P, T) every point's task losses on the exploration's data.
        metrics: per point, the dict `model.evaluate` returned.
        weights: per point, the model's weights in `get_weights()` layout.
        direction_index: (P,) each point's direction (-1 for the start).
        step_index: (P,) each point's step along it (0 for the start).
        damping: (P,) the damping of the solve that gave the step to each
            point: the `damping` asked for, or more where that did not give
            a direction that lowers beta^T f (NaN for the start).
        minres_residual: (P,) that solve's relative residual
            |J^T beta - (H + damping I) v| / |J^T beta| (MINRES's estimate;
            NaN with `solver="scipy"` and for the start).
        descent: (P,) cos(v, J^T beta) of that step: how directly it lowers
            beta^T f (NaN for the start).
        stationarity: (P,) |sum_t alpha_t g_t| / max_t |g_t| at each point,
            alpha the min-norm weights (0 on the Pareto set).
        stopped: `{direction: message}` for the directions that stopped
            before their last step, and why.
        cost: what the exploration cost: backward passes (`gradient_passes`,
            each the gradient of one combination of the losses), forward-mode
            passes (`jvp_passes`, each J v), Hessian-vector products
            (`hvp_passes`) and `evaluate` calls (`evaluation_passes`), each
            with the examples they ran over (`<kind>_examples`), MINRES
            iterations per solve (retries at a raised damping included), the
            number of examples and the wall time in seconds.
        model: the model `restore` and `interpolate` set by default (not
            saved).

    Example:

    ```python
    front = keras_mgda.pareto.explore(model, x, y)
    best = front.losses[front.pareto_mask()]
    front.restore(4)
    front.save("front.npz")
    front = keras_mgda.pareto.ParetoFront.load("front.npz")
    ```
    """

    def __init__(self, task_names, directions, model=None):
        self.task_names = list(task_names)
        self.directions = np.asarray(directions, np.float32).reshape(-1, len(self.task_names))
        self._losses = []
        self.metrics = []
        self.weights = []
        self._direction = []
        self._step = []
        self._diagnostics = {name: [] for name in DIAGNOSTICS}
        self.stopped = {}
        self.cost = {}
        self.model = model

    def add(self, losses, metrics, weights, direction, step, **diagnostics):
        """Appends a point (used by `explore`); `diagnostics` are values of
        `DIAGNOSTICS` (NaN where not given)."""
        unknown = set(diagnostics) - set(DIAGNOSTICS)
        if unknown:
            raise ValueError(f"Unknown diagnostics {sorted(unknown)}; a point records {DIAGNOSTICS}.")
        self._losses.append(np.asarray(losses, np.float64))
        self.metrics.append(dict(metrics))
        self.weights.append([np.array(w) for w in weights])
        self._direction.append(int(direction))
        self._step.append(int(step))
        for name in DIAGNOSTICS:
            self._diagnostics[name].append(float(diagnostics.get(name, np.nan)))

    def __len__(self):
        return len(self._losses)

    @property
    def losses(self):
        return np.stack(self._losses) if self._losses else np.zeros((0, len(self.task_names)))

    @property
    def direction_index(self):
        return np.asarray(self._direction, np.int64)

    @property
    def step_index(self):
        return np.asarray(self._step, np.int64)

    @property
    def damping(self):
        return np.asarray(self._diagnostics["damping"], np.float64)

    @property
    def minres_residual(self):
        return np.asarray(self._diagnostics["minres_residual"], np.float64)

    @property
    def descent(self):
        return np.asarray(self._diagnostics["descent"], np.float64)

    @property
    def stationarity(self):
        return np.asarray(self._diagnostics["stationarity"], np.float64)

    def _model(self, model):
        model = self.model if model is None else model
        if model is None:
            raise ValueError("This front has no model (it was loaded); pass `model=`.")
        return model

    def restore(self, i, model=None):
        """Sets the model's weights to point i's.

        Args:
            i: the point's index.
            model: the model to set (default: the explored one).

        Returns:
            The model.
        """
        model = self._model(model)
        model.set_weights(self.weights[i])
        return model

    def interpolate(self, i, j, t, model=None):
        """The weights on the straight line between points i and j.

        Args:
            i: the first point.
            j: the second (a neighbour of i on the front, for a point on
                the continuous local Pareto set).
            t: 0 gives point i, 1 point j.
            model: a model to set to those weights (default: the explored
                one, if any; a loaded front without one only returns them).

        Returns:
            The weights, in `get_weights()` layout.
        """
        weights = [(1.0 - t) * a + t * b for a, b in zip(self.weights[i], self.weights[j], strict=True)]
        weights = [w.astype(a.dtype) for w, a in zip(weights, self.weights[i], strict=True)]
        model = self.model if model is None else model
        if model is not None:
            model.set_weights(weights)
        return weights

    def pareto_mask(self):
        """(P,) True for the points no other point dominates (every loss
        lower or equal, one lower)."""
        return pareto_mask(self.losses)

    def metric_values(self, metric):
        """(P, T) the metric of each task, from keys `<task>_<metric>`."""
        keys = [f"{name}_{metric}" for name in self.task_names]
        missing = [k for k in keys if k not in self.metrics[0]]
        if missing:
            raise KeyError(f"No metric {missing} in the front; it has {sorted(self.metrics[0])}.")
        return np.asarray([[m[k] for k in keys] for m in self.metrics], np.float64)

    def plot(self, ax=None, tasks=(0, 1), metric=None):
        """Draws the front (see `keras_mgda.pareto.plot.plot_front`)."""
        from keras_mgda.pareto.plot import plot_front

        return plot_front(self, ax=ax, tasks=tasks, metric=metric)

    def save(self, path):
        """Writes the front to a NumPy `.npz` file (no pickled objects)."""
        arrays = {
            "task_names": np.asarray(self.task_names, dtype=str),
            "directions": self.directions,
            "losses": self.losses,
            "direction_index": self.direction_index,
            "step_index": self.step_index,
            "metrics": np.asarray(json.dumps(self.metrics)),
            "cost": np.asarray(json.dumps(self.cost)),
            "stopped": np.asarray(json.dumps({str(k): v for k, v in self.stopped.items()})),
            "diagnostics": np.asarray([self._diagnostics[name] for name in DIAGNOSTICS], np.float64),
            "num_weights": np.asarray([len(w) for w in self.weights], np.int64),
        }
        for p, weights in enumerate(self.weights):
            for k, w in enumerate(weights):
                arrays[f"weight_{p}_{k}"] = w
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path, model=None):
        """Reads a front written by `save`; `model` is the one to restore to."""
        with np.load(path, allow_pickle=False) as data:
            front = cls([str(n) for n in data["task_names"]], data["directions"], model=model)
            metrics = json.loads(str(data["metrics"]))
            counts = data["num_weights"]
            # Fronts saved before points recorded diagnostics load with NaN.
            diagnostics = data["diagnostics"] if "diagnostics" in data else np.full((len(DIAGNOSTICS), 0), np.nan)
            for p, losses in enumerate(data["losses"]):
                weights = [data[f"weight_{p}_{k}"] for k in range(int(counts[p]))]
                values = {name: row[p] for name, row in zip(DIAGNOSTICS, diagnostics) if p < len(row)}
                front.add(losses, metrics[p], weights, data["direction_index"][p], data["step_index"][p], **values)
            front.cost = json.loads(str(data["cost"]))
            if "stopped" in data:
                front.stopped = {int(k): v for k, v in json.loads(str(data["stopped"])).items()}
        return front
