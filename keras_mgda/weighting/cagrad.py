"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent,
written on the Gram matrix."""

import collections
from typing import Literal

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda import solvers
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._gradient_base import check_choice
from keras_mgda.weighting.upgrad import project_onto_dual_cone

__all__ = ["CAGrad", "conflict_averse_dual", "dual_cone_candidate"]

RESCALES = (0, 1, 2)
# Root finding on t (see `CAGrad`): ROUNDS rounds of POINTS interior points
# (all solved at once by min_norm), in a log2 bracket SPAN wide above the
# smallest possible root, which shrinks (POINTS + 1)**ROUNDS = 65536-fold,
# to 1/1600 of an octave; then interpolation along the solution path (exact
# unless the support changes inside the bracket), by BISECTIONS halvings.
# Small batches beat few rounds: min_norm loops until its slowest problem ends.
POINTS = 15
ROUNDS = 4
SPAN = 40.0
BISECTIONS = 30
# The largest ratio kappa = sum_i w_i |g_i| / |g_w| (cancellation among the
# dual gradients) for which the update is put exactly on the ball: the
# precision resolves |g_w| only to ~sqrt(eps) sum_i w_i |g_i|, so beyond
# ~1/sqrt(eps) it is noise (the origin in the hull); regular problems
# measure kappa < 6. CANCELLATION_ERROR / sqrt(eps) keeps that noise at ~1%
# of the radius: 32 in float32 (at least), 6.7e5 in float64.
CANCELLATION_ERROR = 0.01
CANCELLATION = 32.0


@keras.saving.register_keras_serializable(package="keras_mgda")
class CAGrad(GradientWeighting):
    """Conflict-averse gradient descent.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021. The update d maximises the worst
    task's improvement min_i g_i . d within a ball around the average
    gradient g0, ||d - g0|| <= c ||g0||. Its dual is a problem over the
    simplex,

        w = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||,
        phi = c^2 ||g0||^2,  g_w = sum_i w_i g_i,

    and d = g0 + (sqrt(phi) / ||g_w||) g_w, so the weight of task i is
    1/T + sqrt(phi) w_i / ||g_w||.

    The dual is solved exactly with keras.ops and a fixed amount of work:
    its minimiser is the minimum-norm point of the convex hull of the
    shifted gradients {g0 + t g_i} (the problem `keras_mgda.solvers.min_norm`
    solves exactly) for the t at which t ||g_w|| = sqrt(phi), and t ||g_w(t)||
    increases with t, so t is bracketed (four rounds of 15 points solved
    in parallel, over 40 octaves above the smallest possible root, to
    1/1600 of an octave) and w is interpolated along the solution path,
    which is exact within one active set (worst measured optimality
    residuals ~1e-6). Where the dual gradients cancel, so that
    sum_i w_i ||g_i|| exceeds kappa ||g_w|| (regular problems measure below
    6; float32 resolves ||g_w|| only to ~3e-4 sum_i w_i ||g_i||), typically
    because the origin is in the hull of the gradients (g_w can be 0 and the
    dual has no regular solution), the coefficient is capped at
    kappa sqrt(phi) / sum_i w_i ||g_i|| (kappa = 32 in float32, 0.01 /
    sqrt(eps) = 6.7e5 in float64): the update stays inside the ball (to
    ~1% of its radius) and the weights stay bounded. Where the dual has
    no regular solution at all, g0 projected onto the dual cone of the
    gradients is used when it improves the worst task more (see
    `dual_cone_candidate`).

    As in the authors' code, the weights are scaled to the sum of the losses
    (multiplied by T: with c = 0 every weight is 1) and then divided by
    1 + c^2 (`rescale=1`, their default), 1 + c (`rescale=2`) or not at all
    (`rescale=0`). Task heads keep their plain gradients
    (`head_update="full"`), as in their code. Tasks whose gradient is
    exactly zero are left out of the dual problem.

    Args:
        c: the radius of the ball, relative to ||g0|| (the paper's c,
            default 0.4 as in the paper). 0 gives the average gradient;
            large c turns d towards MGDA's direction; for c >= 1 the ball
            holds the origin, so no task loss increases to first order.
        rescale: 0, 1 or 2, the final division (none, 1 + c^2, 1 + c).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, T (1/T + sqrt(phi) w / ||g_w||)
        divided according to `rescale`.

    Example:

    ```python
    weighting = keras_mgda.weighting.CAGrad(c=0.4)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(
        self,
        c: float = 0.4,
        rescale: Literal[0, 1, 2] = 1,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c!r}.")
        check_choice("rescale", rescale, RESCALES)
        self.c = float(c)
        self.rescale = rescale

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        num_tasks = gram.num_tasks
        coefficient, dual = conflict_averse_dual(gram.unit, gram.active, self.c, ops=ops)
        regular = 1.0 / num_tasks + coefficient * dual
        projected = dual_cone_candidate(gram.unit, self.c, ops=ops)
        combination = _better_update(gram.unit, gram.active, regular, projected, ops=ops)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return gram.finish(combination * num_tasks / divisor)

    def get_config(self):
        config = super().get_config()
        config.update({"c": self.c, "rescale": self.rescale})
        return config


def dual_cone_candidate(gram, c, *, ops=keras.ops):
    """The update for a degenerate dual: g0 projected onto the dual cone of
    the task gradients, {d : g_i . d >= 0 for all i}, pulled back into the
    ball if rounding left it outside.

    Where that projection lies in the ball, no task conflicts with it and
    it is optimal whenever the optimum is 0 (the origin in the hull of the
    gradients), which is exactly where the dual's g_w vanishes and its
    formula d = g0 + sqrt(phi) g_w / |g_w| says nothing.

    Args:
        gram: (T, T) Gram matrix (max diagonal ~ 1).
        c: the radius relative to ||g0||.
        ops: the namespace of array functions (default `keras.ops`).

    Returns:
        (T,) coefficients x of the update d = sum_i x_i g_i.
    """
    num_tasks = gram.shape[-1]
    mean = ops.full((num_tasks,), 1.0 / num_tasks, dtype=gram.dtype)
    projected = project_onto_dual_cone(gram, mean[None, :], ops=ops)[0]
    offset = projected - mean
    distance2 = nx.dot(offset, nx.matvec(gram, offset, ops=ops), ops=ops)
    radius2 = c * c * nx.dot(mean, nx.matvec(gram, mean, ops=ops), ops=ops)
    inside = distance2 <= radius2
    shrink = ops.sqrt(radius2 / ops.where(inside, 1.0, distance2))
    return mean + ops.where(inside, 1.0, shrink) * offset


def _better_update(gram, mask, first, second, *, ops):
    """Of two updates inside the ball, the one whose worst task improves
    most, min_i (M x)_i over the tasks that take part (ties: `first`)."""
    worst = [ops.min(ops.where(mask, nx.matvec(gram, x, ops=ops), np.inf)) for x in (first, second)]
    return ops.where(worst[1] > worst[0], second, first)


def conflict_averse_dual(gram, mask, c, *, ops=keras.ops):
    """CAGrad's dual weights w and the coefficient sqrt(phi) / ||g_w||.

    Args:
        gram: (T, T) Gram matrix (max diagonal ~ 1).
        mask: bool (T,), tasks that take part in the dual problem.
        c: the radius relative to ||g0||.
        ops: the namespace of array functions (default `keras.ops`).

    Returns:
        `(coefficient, w)`: a scalar and (T,) weights on the simplex, with
        d = g0 + coefficient * sum_i w_i g_i.
    """
    path = _DualPath(gram, mask, c, ops)
    low, high = path.bracket()
    weights, norm = path.interpolate(low, high)
    # Exactly on the ball: coefficient radius / |g_w|, as in the paper. If
    # no t in the bracket reaches the radius, stay at its end, inside.
    saturated = (high.norm < path.radius) | ~(norm > 0)
    coefficient = ops.where(
        saturated, ops.power(path.two, high.exponent), path.radius / ops.where(norm > 0, norm, 1.0)
    )
    weights = ops.where(saturated, high.weights, weights)
    return path.capped(coefficient, weights), weights


_Point = collections.namedtuple("_Point", ["exponent", "norm", "weights"])


class _DualPath:
    """The solution path w(t) of CAGrad's dual: the min-norm point of the
    shifted gradients {g0 + t g_i}, and t ||g_w(t)||, which increases with
    t and crosses the radius at the dual's solution."""

    def __init__(self, gram, mask, c, ops):
        self.gram, self.mask, self.ops = gram, mask, ops
        self.zero = nx.const(0.0, gram, ops=ops)
        self.two = nx.const(2.0, gram, ops=ops)
        # Sums, not ops.mean or ops.matmul here and below: Keras's torch
        # backend computes those in float32 for float64 input.
        num_tasks = gram.shape[-1]
        self.mean = ops.sum(gram, axis=-1) / num_tasks  # g_i . g0
        self.g0_norm2 = nx.maximum(ops.sum(self.mean) / num_tasks, self.zero, ops=ops)
        self.radius = c * ops.sqrt(self.g0_norm2)
        largest = ops.sqrt(ops.max(ops.where(mask, ops.diagonal(gram), 0.0)))
        # t ||g_w(t)|| <= t max_i ||g_i||, so the root is at least radius / largest.
        self.positive = (self.radius > 0) & (largest > 0)
        safe = lambda x: ops.where(self.positive, x, 1.0)  # noqa: E731
        self.lowest = ops.log2(safe(self.radius) / safe(largest))

    def norm_of(self, weights):
        """|g_w| for (..., T) weights."""
        ops = self.ops
        squared = nx.dot(weights, nx.matvec(self.gram, weights, ops=ops), ops=ops)
        return ops.sqrt(nx.maximum(squared, self.zero, ops=ops))

    def solve(self, exponents):
        """w(t) and t ||g_w(t)|| for a batch of t = 2**exponents."""
        ops = self.ops
        ts = ops.power(self.two, exponents)
        t = ts[:, None, None]
        shifted = self.g0_norm2 + t * (self.mean[None, :, None] + self.mean[None, None, :])
        shifted = shifted + t * t * self.gram[None]
        weights = solvers.min_norm(shifted, mask=self.mask, ops=ops)
        return ts * self.norm_of(weights), weights

    def crossing(self, exponents, norms, weights):
        """The first point with t ||g_w(t)|| at or above the radius, and the
        one before it. (The first crossing, not a count of the points
        below: far above the root, rounding in the shifted Gram matrix can
        bring t ||g_w(t)|| back below the radius.)"""
        ops = self.ops
        reached = norms >= self.radius
        last = exponents.shape[0] - 1
        first = ops.argmax(ops.cast(reached, "int32"))
        crossed = ops.any(reached)
        high = ops.where(crossed, first, last)
        low = ops.where(crossed, ops.clip(first - 1, 0, last), last)

        def point(i):
            return _Point(*(ops.take(x, i, axis=0) for x in (exponents, norms, weights)))

        return point(low), point(high)

    def bracket(self):
        """ROUNDS rounds of POINTS + 2 problems solved at once, from the
        bracket's low end to its high end (one min_norm in the loop keeps
        compiled code small); returns the final bracket's two points."""
        ops = self.ops
        fractions = ops.arange(POINTS + 2, dtype=self.gram.dtype) / (POINTS + 1)

        def round_(_, state):
            low, high = state[0], state[3]
            exponents = low + (high - low) * fractions
            low_point, high_point = self.crossing(exponents, *self.solve(exponents))
            return tuple(low_point) + tuple(high_point)

        # (The norms and weights of the initial state are placeholders.)
        one = nx.const(1.0, self.gram, ops=ops)
        placeholder = ops.zeros((self.gram.shape[-1],), dtype=self.gram.dtype)
        state = (self.lowest, one, placeholder, self.lowest + SPAN, one, placeholder)
        state = ops.fori_loop(0, ROUNDS, round_, state)
        return _Point(*state[:3]), _Point(*state[3:])

    def interpolate(self, low, high):
        """The dual's weights between the bracket's two points, and their
        |g_w|. Within one piece of the solution path w(t) is affine in 1/t
        (the KKT system of a fixed support), so along
        w(s) = (1 - s) w_low + s w_high, 1/t(s) = (1 - s) / t_low + s / t_high,
        the root of h(s) = |G^T w(s)|^2 - radius^2 / t(s)^2 is found by
        bisection."""
        ops, gram, radius2 = self.ops, self.gram, self.radius**2
        inverse_low = ops.power(self.two, -low.exponent)
        inverse_step = ops.power(self.two, -high.exponent) - inverse_low
        step = high.weights - low.weights
        def form(a, b):
            return nx.dot(a, nx.matvec(gram, b, ops=ops), ops=ops)

        quadratic = [
            form(low.weights, low.weights) - radius2 * inverse_low**2,
            2.0 * (form(low.weights, step) - radius2 * inverse_low * inverse_step),
            form(step, step) - radius2 * inverse_step**2,
        ]

        def bisect(_, interval):
            left, right = interval
            middle = 0.5 * (left + right)
            value = quadratic[0] + middle * (quadratic[1] + middle * quadratic[2])
            return ops.where(value < 0, middle, left), ops.where(value < 0, right, middle)

        one = nx.const(1.0, gram, ops=ops)
        left, right = ops.fori_loop(0, BISECTIONS, bisect, (self.zero, one))
        weights = low.weights + 0.5 * (left + right) * step
        return weights, self.norm_of(weights)

    def capped(self, coefficient, weights):
        """The coefficient with the cancellation capped: coefficient *
        sum_i w_i |g_i| <= kappa * radius (kappa: see CANCELLATION), so the
        rounding error of |g_w| moves the update by at most ~1% of
        the radius (a smaller coefficient stays inside the ball); 0 where
        the radius or every gradient is 0."""
        ops = self.ops
        norms = ops.sqrt(nx.maximum(ops.diagonal(self.gram), self.zero, ops=ops))
        spread = ops.sum(weights * norms)
        cancellation = max(CANCELLATION, CANCELLATION_ERROR / np.sqrt(nx.eps(nx.float_dtype(self.gram))))
        cap = cancellation * self.radius / ops.where(spread > 0, spread, 1.0)
        coefficient = ops.where(spread > 0, nx.minimum(coefficient, cap, ops=ops), coefficient)
        return ops.where(self.positive, coefficient, 0.0)
