"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent,
written on the Gram matrix."""

import keras
from keras import ops

from keras_mgda import solvers
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._gradient_base import check_choice

RESCALES = (0, 1, 2)
# Root finding on t (see `CAGrad`): ROUNDS rounds of POINTS points each, in
# a log2 bracket SPAN wide above the smallest possible root: the bracket
# shrinks (POINTS + 1)**ROUNDS = 16**5 ~ 1e6-fold, to ~1e-5 relative in t.
POINTS = 15
ROUNDS = 5
SPAN = 16.0


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
    increases with t, so t is found by a bracketing search (five rounds of
    15 points in parallel, about 1e-5 relative). When no t reaches
    sqrt(phi) within 2**16 of the smallest possible root (the gradients
    nearly cancel, so g_w can be 0), t stops there: the update stays inside
    the ball and the weights stay moderate.

    As in the authors' code, the weights are scaled to the sum of the losses
    (multiplied by T: with c = 0 every weight is 1) and then divided by
    1 + c^2 (`rescale=1`, their default), 1 + c (`rescale=2`) or not at all
    (`rescale=0`). Task heads keep their plain gradients
    (`head_update="full"`), as in their code. Tasks whose gradient is
    exactly zero are left out of the dual problem.

    Args:
        c: the radius of the ball, relative to ||g0|| (the paper's c; 0.4
            is its choice for NYUv2 and Cityscapes). 0 gives the average
            gradient; large c approaches MGDA.
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

    def __init__(self, c=0.4, rescale=1, mode="representation", head_update="full", **kwargs):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c!r}.")
        check_choice("rescale", rescale, RESCALES)
        self.c = float(c)
        self.rescale = rescale

    def call(self, losses, gram=None):
        gram = GramInput(gram)
        num_tasks = gram.num_tasks
        coefficient, dual = conflict_averse_dual(gram.unit, gram.active, self.c)
        weights = (1.0 / num_tasks + coefficient * dual) * num_tasks
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return gram.finish(weights / divisor)

    def get_config(self):
        config = super().get_config()
        config.update({"c": self.c, "rescale": self.rescale})
        return config


def conflict_averse_dual(gram, mask, c):
    """CAGrad's dual weights w and the coefficient sqrt(phi) / ||g_w||.

    Args:
        gram: (T, T) Gram matrix (max diagonal ~ 1).
        mask: bool (T,), tasks that take part in the dual problem.
        c: the radius relative to ||g0||.

    Returns:
        `(coefficient, w)`: a scalar and (T,) weights on the simplex, with
        d = g0 + coefficient * sum_i w_i g_i.
    """
    num_tasks = gram.shape[-1]
    dtype = gram.dtype
    mean = ops.mean(gram, axis=-1)  # g_i . g0
    g0_norm2 = solvers._maximum(ops.mean(mean), solvers._const(0.0, gram))
    radius = c * ops.sqrt(g0_norm2)
    largest = ops.sqrt(ops.max(ops.where(mask, ops.diagonal(gram), 0.0)))
    # t ||g_w(t)|| <= t max_i ||g_i||, so the root is at least radius / largest.
    positive = (radius > 0) & (largest > 0)
    low = ops.log2(ops.where(positive, radius, 1.0) / ops.where(positive, largest, 1.0))

    def solve(ts):
        """w(t) for a batch of t: the min-norm point of {g0 + t g_i}."""
        t = ts[:, None, None]
        shifted = g0_norm2 + t * (mean[None, :, None] + mean[None, None, :]) + t * t * gram[None]
        weights = solvers.min_norm(shifted, mask=mask)
        norms = ts * ops.sqrt(
            solvers._maximum(ops.sum(weights * ops.matmul(weights, gram), axis=-1), solvers._const(0.0, gram))
        )
        return norms, weights

    fractions = ops.arange(1, POINTS + 1, dtype=dtype) / (POINTS + 1)

    def round_(index, bracket):
        low, width = bracket
        points = low + width * fractions
        norms, _ = solve(ops.power(solvers._const(2.0, gram), points))
        # The root lies above every point whose t ||g_w(t)|| is below radius.
        below = ops.sum(ops.cast(norms < radius, dtype))
        width = width / (POINTS + 1)
        return low + width * below, width

    low, _ = ops.fori_loop(0, ROUNDS, round_, (low, solvers._const(SPAN, gram)))
    t = ops.power(solvers._const(2.0, gram), low)
    _, weights = solve(ops.reshape(t, (1,)))
    coefficient = ops.where(positive, t, 0.0)
    return coefficient, weights[0]
