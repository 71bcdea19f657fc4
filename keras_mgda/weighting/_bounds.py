"""How far each weighting's update can reach on degenerate input: the
documented bound of every method and the degenerate problems it is
checked on (tests/weighting/test_degenerate.py) and measured on
(benchmarks/degenerate_bounds.py, docs/guide/reliability.md).

The update of a step is d = sum_t w_t g_t on the shared side (or an
aggregator's direction) and h_t times its own gradient on task t's head.
Each bound says how long either may be, in one of three units:

- `"gradient"`: times max_t |g_t|, the longest task gradient (the update
  follows the gradients' size);
- `"slope"`: times max_t |g_t| / L_t over the tasks in the step (methods
  on log losses, whose gradient is g_t / L_t; a task with L_t <= their
  epsilon is solved and left out);
- `"absolute"`: a length, whatever the gradients' size (Nash-MTL's and
  FairGrad's update is scale-free by design).

A head's reach is |h_t| |g_t| in the same unit: the head's gradient is
taken to be as long as the task's (both scale with the task's loss).
"""

import collections
import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np

__all__ = ["BOUNDS", "FAMILIES", "UNITS", "Bound", "Reach", "families", "make", "reach"]

# A bound factor: (weighting, number of tasks, losses) -> float.
Factor = Callable[[object, int, np.ndarray], float]
UNITS = {"gradient": "max_t |g_t|", "slope": "max_t |g_t| / L_t", "absolute": "(absolute)"}


@dataclasses.dataclass(frozen=True)
class Bound:
    """A method's documented bound.

    Attributes:
        policy: what the method does where its formula would explode.
        shared: (unit, factor, factor in words) of the shared update.
        heads: (unit, factor, factor in words) of each head's update.
    """

    policy: str
    shared: tuple[str, Factor, str]
    heads: tuple[str, Factor, str]


def _const(value):
    return lambda weighting, num_tasks, losses: float(value)


def _tasks(scale=1.0):
    return lambda weighting, num_tasks, losses: scale * num_tasks


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _geometric_mean(weighting, num_tasks, losses):
    kept = np.asarray(losses, np.float64)[np.asarray(losses) > weighting.epsilon]
    return float(np.exp(np.mean(np.log(kept + weighting.epsilon)))) if kept.size else 0.0


def _lbtw(weighting, num_tasks, losses):
    initial = np.maximum(_numpy(weighting.initial_losses), weighting.epsilon)
    return num_tasks * float(np.max(np.maximum(np.asarray(losses) / initial, 0.0) ** weighting.alpha))


def _cagrad(weighting, num_tasks, losses):
    c = weighting.c
    return num_tasks * (1 + c) / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[weighting.rescale]


def _largest_scale(weighting, num_tasks, losses):
    return float(np.exp(_numpy(weighting.log_scales)).max())


def _inverse_variance(weighting, num_tasks, losses):
    return float(0.5 * np.exp(-_numpy(weighting.log_variances)).max())


def _times_tasks(factor):
    return lambda weighting, num_tasks, losses: num_tasks * factor(weighting, num_tasks, losses)


ONE = ("gradient", _const(1.0), "1")
SUM = ("gradient", _tasks(), "T")  # T terms, each at most the longest gradient
SLOPES = ("slope", _tasks(), "T")
SOLVED = "a task with loss <= epsilon is solved: weight 0 for the step"

BOUNDS = {
    "alignedmtl": Bound("none needed (the whitened gradients keep the smallest singular value)", SUM, ONE),
    "cagrad": Bound("none needed", ("gradient", _cagrad, "T (1 + c) / (1 + c^2)"), ONE),
    "config": Bound("none needed (a unit direction times the summed projections)", SUM, ONE),
    "crmogm": Bound("the wrapped weighting's (MGDA by default)", ONE, ONE),
    "dbmtl": Bound(SOLVED + "; a zero gradient gets weight 0", SLOPES, ("slope", _const(1.0), "1")),
    "dtp": Bound(
        "the KPI is floored at epsilon",
        ("gradient", lambda w, t, losses: -t * math.log(w.epsilon), "-T log(epsilon)"),
        ("gradient", lambda w, t, losses: -math.log(w.epsilon), "-log(epsilon)"),
    ),
    "dualproj": Bound("none needed (a projection of the mean gradient)", ONE, ONE),
    "dwa": Bound("none needed (T softmax)", SUM, SUM),
    "excessmtl": Bound("none needed (the weights sum to T)", SUM, SUM),
    "fairgrad": Bound(
        "cap: weights scaled down to weight_cap (100) times their value for orthogonal gradients",
        ("absolute", lambda w, t, losses: math.sqrt(t), "sqrt(T) (alpha = 1)"), ONE,
    ),
    "famo": Bound(SOLVED, ONE, ONE),
    "gls": Bound(
        SOLVED + " and leaves the product",
        ("slope", _geometric_mean, "GM of the other losses"), ("slope", _geometric_mean, "GM"),
    ),
    "graddrop": Bound("none needed (signs are masked, never scaled)", SUM, ONE),
    "gradnorm": Bound("none needed (the weights are normalised to sum T)", SUM, SUM),
    "gradvac": Bound(
        "cap: each corrected gradient at most growth_cap (10) times its own", ("gradient", _tasks(10.0), "10 T"), ONE
    ),
    "imtl": Bound(
        "none needed (IMTL-G on the learned scales)", ("gradient", _largest_scale, "max e^s (learned)"), ONE
    ),
    "imtlg": Bound("none needed (equal projections)", ONE, ONE),
    "imtll": Bound(
        "none needed (learned scales)",
        ("gradient", _times_tasks(_largest_scale), "T max e^s (learned)"),
        ("gradient", _largest_scale, "max e^s"),
    ),
    "lbtw": Bound(
        "none needed (loss ratios)", ("gradient", _lbtw, "T max (L / L0)^alpha"), ("gradient", _lbtw, "same")
    ),
    "mgda": Bound("zero-gradient tasks are left out", ONE, ONE),
    "moco": Bound(
        "the simplex projection is shifted to its largest entry (a task 1e8 larger rounded it away)",
        ("gradient", _tasks(), "T (tracked estimates)"), ONE,
    ),
    "nashmtl": Bound(
        "cap: alpha_t |g_t| scaled down to weight_cap (10)",
        ("absolute", lambda w, t, losses: min(math.sqrt(t), w.max_norm or math.inf), "min(sqrt(T), max_norm)"),
        ("absolute", lambda w, t, losses: math.inf if w.weight_cap is None else w.weight_cap, "weight_cap"),
    ),
    "pcgrad": Bound("none needed (projections shorten)", SUM, ONE),
    "rlw": Bound("none needed (a softmax)", ONE, ONE),
    "scaleinvariant": Bound(SOLVED, SLOPES, ("slope", _const(1.0), "1")),
    "sdmgrad": Bound("zero-gradient tasks are left out", ONE, ONE),
    "static": Bound(
        "none needed",
        ("gradient", lambda w, t, losses: sum(w._resolved), "sum of the weights"),
        ("gradient", lambda w, t, losses: max(w._resolved), "largest weight"),
    ),
    "stch": Bound(SOLVED + " (times its nadir value)", SLOPES, SLOPES),
    "uncertainty": Bound(
        "none needed (learned variances)",
        ("gradient", _times_tasks(_inverse_variance), "T max e^-s / 2 (learned)"),
        ("gradient", _inverse_variance, "max e^-s / 2"),
    ),
    "uniform": Bound("none needed", ONE, ONE),
    "upgrad": Bound("none needed (projections onto the dual cone shorten)", ONE, ONE),
}


# ----------------------------------------------------------- the problems

FAMILIES = (
    "one_task", "zero_gradient", "all_zero", "zero_loss", "identical", "opposite",
    "one_1e8_larger", "rank_deficient", "tiny",
)


def families(seed=0, num_tasks=3, dim=6):
    """The degenerate problems: {name: (G (T, D) float64, L (T,))}.

    Task gradients of norms 0.5 to 2 (exact in float32), losses 1, and:
    one task; a zero gradient; every gradient zero; a zero loss with a
    nonzero gradient; identical gradients; two opposite gradients (and a
    third); one task 1e8 larger (gradient and loss); four gradients in a
    plane (rank 2); every gradient 1e-6 as long.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((num_tasks, dim))
    g *= rng.uniform(0.5, 2.0, (num_tasks, 1)) / np.linalg.norm(g, axis=1, keepdims=True)
    g = g.astype(np.float32).astype(np.float64)
    ones = np.ones(num_tasks)
    zero_gradient, zero_loss, opposite, larger = g.copy(), ones.copy(), g.copy(), g.copy()
    zero_gradient[1] = 0.0
    zero_loss[0] = 0.0
    opposite[1] = -opposite[0]
    larger[0] *= 1e8
    plane = rng.standard_normal((4, 2)) @ rng.standard_normal((2, dim))
    return {
        "one_task": (g[:1], ones[:1]),
        "zero_gradient": (zero_gradient, ones),
        "all_zero": (np.zeros_like(g), ones),
        "zero_loss": (g, zero_loss),
        "identical": (np.repeat(g[:1], num_tasks, axis=0), ones),
        "opposite": (opposite, ones),
        "one_1e8_larger": (larger, np.concatenate([[1e8], ones[1:]])),
        "rank_deficient": (plane.astype(np.float32).astype(np.float64), np.ones(4)),
        "tiny": (g * 1e-6, ones),
    }


def make(name, num_tasks, **options):
    """The weighting `name` with its defaults, built for `num_tasks` tasks
    (seeded where it draws; Static with weights 0.2 to 0.5; STCH with a
    one-epoch warm-up, so that a few steps see both phases); `options`
    override the defaults."""
    from keras_mgda import weighting as package

    cls = package.by_name()[name]
    if name == "static":
        options.setdefault("weights", list(np.linspace(0.2, 0.5, num_tasks)))
    if name == "stch":
        options.setdefault("warmup_epochs", 1)
    if name in ("pcgrad", "rlw", "gradvac", "graddrop"):
        options.setdefault("seed", 0)
    return cls(**options)


# ------------------------------------------------------------ measuring

Reach = collections.namedtuple("Reach", ["shared", "shared_bound", "heads", "heads_bound", "finite"])


def _unit(kind, g, losses, weighting):
    """The length a bound's factor multiplies (see the module docstring)."""
    norms = np.linalg.norm(g, axis=1)
    if kind == "absolute":
        return 1.0
    if kind == "slope":
        kept = np.asarray(losses) > weighting.epsilon
        return float(np.max(norms[kept] / losses[kept])) if kept.any() else 0.0
    return float(norms.max())


def _ratio(length, unit):
    if unit > 0:
        return length / unit
    return 0.0 if length == 0 else math.inf


def _step(weighting, g, losses):
    """One step as the model takes it: the shared direction (D,), the task
    weights and the head weights (T,), as float64 NumPy."""
    ops = keras.ops
    num_tasks = g.shape[0]
    if num_tasks == 1:  # the step trains one task as plain Keras
        return g[0], np.ones(1), np.ones(1)
    g32 = g.astype(np.float32)
    gram = ops.convert_to_tensor((g @ g.T).astype(np.float32))
    losses32 = ops.convert_to_tensor(np.asarray(losses, np.float32))
    if getattr(weighting, "aggregates_gradients", False):
        batched = g32 if weighting.gradient_space == "parameters" else g32[:, None, :]
        directions, weights = weighting.aggregate([ops.convert_to_tensor(batched)], losses32, gram)
        direction = np.asarray(ops.convert_to_numpy(directions[0]), np.float64).reshape(-1)
    else:
        weights = weighting(losses32, gram if weighting.requires_gram else None)
        direction = np.asarray(ops.convert_to_numpy(weights), np.float64) @ g
    heads = weighting.head_weights(weights)
    return direction, np.asarray(ops.convert_to_numpy(weights), np.float64), np.asarray(
        ops.convert_to_numpy(heads), np.float64
    )


def _built(name, g, options):
    num_tasks, dim = g.shape
    weighting = make(name, num_tasks, **options)
    if getattr(weighting, "needs_gradient_shapes", False):
        weighting.set_gradient_shapes([(dim,)] if weighting.gradient_space == "parameters" else [(None, dim)])
    weighting.build(num_tasks, [f"task{i}" for i in range(num_tasks)])
    return weighting


def reach(name, g, losses, steps=3, **options):
    """Runs the weighting `name` (fresh) for `steps` steps on the problem
    (g, losses), as the step does (an `AfterUpdateHook` sees the losses
    fall by 10%, an epoch ends after every step), and returns the largest
    `Reach`: the shared and head updates in their bound's unit, beside the
    documented factors, and whether every weight was finite. `options`
    go to the weighting's constructor."""
    weighting = _built(name, g, options)
    bound = BOUNDS[name]
    if g.shape[0] == 1:  # trained as plain Keras: weight 1, whatever the method
        bound = Bound(bound.policy, ONE, ONE)
    worst = Reach(0.0, 0.0, 0.0, 0.0, True)
    for index in range(steps):
        direction, weights, heads = _step(weighting, g, losses)
        shared_unit = _unit(bound.shared[0], g, losses, weighting)
        heads_unit = _unit(bound.heads[0], g, losses, weighting)
        lengths = np.abs(heads) * np.linalg.norm(g, axis=1)
        now = Reach(
            _ratio(float(np.linalg.norm(direction)), shared_unit),
            bound.shared[1](weighting, g.shape[0], losses),
            max(_ratio(float(length), heads_unit) for length in lengths),
            bound.heads[1](weighting, g.shape[0], losses),
            bool(np.all(np.isfinite(weights)) and np.all(np.isfinite(heads)) and np.all(np.isfinite(direction))),
        )
        worst = Reach(*(max(a, b) for a, b in zip(worst[:4], now[:4], strict=True)), worst.finite and now.finite)
        if getattr(weighting, "needs_losses_after_update", False) and g.shape[0] > 1:
            weighting.after_update(keras.ops.convert_to_tensor(np.float32(losses)),
                                   keras.ops.convert_to_tensor(np.float32(0.9 * np.asarray(losses))))
        if weighting.has_epoch_hook:
            weighting.on_epoch_end(index, {})
    return worst
