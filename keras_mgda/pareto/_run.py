"""One exploration's state and primitives: the model, the variables that
move, the data, the costs, and the passes each step is made of."""

import collections

import keras
import numpy as np

from keras_mgda import backend as mtl_backend
from keras_mgda import solvers
from keras_mgda.backend import numpy_ops
from keras_mgda.pareto import _checks
from keras_mgda.pareto.minres import minres
from keras_mgda.pareto.scipy_minres import scipy_minres

__all__ = ["Point", "Run", "dot", "norm", "stationarity"]

# One point of the walk: losses (T,), Gram matrix (T, T), min-norm weights
# alpha (T,), J^T beta (None when not asked for), where it is (for errors).
Point = collections.namedtuple("Point", ["losses", "gram", "alpha", "rhs", "where"])


def dot(a, b):
    """<a, b> for two lists of tensors, as a Python float."""
    return float(sum(keras.ops.convert_to_numpy(keras.ops.sum(x * y)) for x, y in zip(a, b, strict=True)))


def norm(vectors):
    return float(np.sqrt(dot(vectors, vectors)))


def stationarity(gram, alpha):
    """|sum_t alpha_t g_t| / max_t |g_t| from the Gram matrix G G^T: 0 at a
    Pareto-stationary point, 1 when the gradients do not conflict at all
    (the min-norm element is as long as the longest gradient)."""
    gram = np.asarray(gram, np.float64)
    largest = float(np.max(np.diag(gram)))
    if largest <= 0:
        return 0.0
    return float(np.sqrt(max(float(alpha @ gram @ alpha), 0.0) / largest))


class Run:
    """One exploration: the model, what moves, the data, and the costs."""

    def __init__(self, model, variables, data, task_names, options):
        self.model = model
        self.variables = variables
        self.data = data
        self.task_names = list(task_names)
        self.options = options
        self.num_tasks = len(self.task_names)
        # Passes of each kind, and the examples they ran over (a pass over
        # a step's sample counts its examples, one over all the data all).
        self.cost = {
            "gradient_passes": 0, "jvp_passes": 0, "hvp_passes": 0, "evaluation_passes": 0,
            "gradient_examples": 0, "jvp_examples": 0, "hvp_examples": 0, "evaluation_examples": 0,
            "minres_iterations": [], "examples": data.count, "seconds": 0.0,
        }
        self._rng = np.random.default_rng(options["seed"])
        self.use_all()

    @property
    def sampling(self):
        """Whether each step draws its own batches."""
        count = self.options["sample_batches"]
        return count is not None and count < len(self.data.batches)

    def use_all(self):
        """The next averages run over all the batches."""
        self._use(range(len(self.data.batches)))

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

    def _count(self, kind, passes=1, examples=None):
        self.cost[f"{kind}_passes"] += passes
        self.cost[f"{kind}_examples"] += passes * (self.cost["examples_per_pass"] if examples is None else examples)

    def _average(self, primitive, *args):
        """The average of a per-batch primitive's result over the batches."""
        return mtl_backend.batch_average(primitive, self.model, self.variables, self.batches, self.shares, *args)

    def combined(self, coefficients):
        """Losses (T,) and J^T coefficients over the current batches, one
        backward pass."""
        coefficients = np.asarray(coefficients, np.float32)
        losses, grads = self._average(mtl_backend.weighted_gradient, coefficients)
        self._count("gradient")
        return np.asarray(keras.ops.convert_to_numpy(losses), np.float64), list(grads)

    def point(self, where, beta=None):
        """Task losses, the Gram matrix J J^T, its min-norm weights and (for
        a given beta) J^T beta, holding at most two parameter-sized vectors:
        column t of the Gram matrix is J g_t, one forward-mode pass along
        g_t, so no (T x parameters) matrix is formed. Raises
        FloatingPointError, naming the task and `where`, on a loss or
        gradient that is not finite."""
        num_tasks = self.num_tasks
        gram = np.zeros((num_tasks, num_tasks))
        rhs = None
        for t in range(num_tasks):
            losses, g_t = self.combined(np.eye(num_tasks)[t])
            _checks.check_finite_losses(losses, self.task_names, where)
            gram[:, t] = keras.ops.convert_to_numpy(self._average(mtl_backend.task_jvp, g_t))
            self._count("jvp")
            if beta is not None and beta[t] != 0:
                part = [float(beta[t]) * g for g in g_t]
                rhs = part if rhs is None else [r + p for r, p in zip(rhs, part, strict=True)]
        if beta is not None and rhs is None:
            rhs = [keras.ops.zeros_like(g) for g in g_t]
        gram = (gram + gram.T) / 2
        _checks.check_finite_gram(gram, self.task_names, where)
        # The raw gradients' min-norm weights, as in the KKT condition the
        # exploration follows (no normalisation).
        alpha = np.asarray(solvers.min_norm(gram, ops=numpy_ops), np.float64)
        return Point(losses, gram, alpha, rhs, where)

    def solve(self, point, damping):
        """MINRES on (H + damping I) v = J^T beta at this point.

        Returns:
            `(v, relative residual)`.
        """
        options = self.options
        settings = dict(damping=damping, max_iters=options["minres_iters"], tol=options["tol"])
        system = (self.model, self.variables, self.batches, self.shares, point.alpha.astype(np.float32))
        if options["solver"] == "scipy":
            v, iterations, residual = scipy_minres(mtl_backend.averaged_hvp(*system), point.rhs, **settings)
        else:
            v, iterations, residual = mtl_backend.hessian_solve(*system, point.rhs, minres, **settings)
        iterations = int(keras.ops.convert_to_numpy(iterations))
        self.cost["minres_iterations"].append(iterations)
        self._count("hvp", iterations)
        return v, float(keras.ops.convert_to_numpy(residual))

    def move(self, vectors, scale):
        """x <- x - scale * vectors."""
        for variable, vector in zip(self.variables, vectors, strict=True):
            variable.assign(variable - keras.ops.cast(scale, variable.dtype) * keras.ops.cast(vector, variable.dtype))

    def correct(self, where):
        """MGDA steps back towards the Pareto set: x <- x - lr * J^T alpha."""
        lr = self.options["correction_step_size"]
        for _ in range(self.options["correction_steps"]):
            self.move(self.combined(self.point(where).alpha)[1], lr)

    def evaluate(self, plan, where):
        """The point's task losses (with `loss_weights`) and `evaluate`'s
        metrics, on the exploration's data."""
        x, y, batch_size = self.data.source
        metrics = self.model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        self._count("evaluation", examples=self.data.count)
        losses = [metrics[f"{name}_loss"] * w for name, w in zip(plan.task_names, plan.loss_weights, strict=True)]
        _checks.check_finite_losses(losses, self.task_names, where)
        return np.asarray(losses, np.float64), {k: float(v) for k, v in metrics.items()}
