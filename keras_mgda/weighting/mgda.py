"""MGDA (Sener & Koltun, NeurIPS 2018): the minimum-norm point of the convex
hull of the per-task gradients."""

from typing import Literal

import keras

from keras_mgda import solvers
from keras_mgda.weighting._gradient_base import GradientWeighting

__all__ = ["MGDA"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class MGDA(GradientWeighting):
    """Multiple-gradient descent: weights alpha on the simplex that minimise
    || sum_t alpha_t g_t ||, the common descent direction of all tasks (or a
    proof that the point is Pareto stationary when that norm is 0).

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018. With `mode="representation"` (MGDA-UB, the default) the
    gradients g_t are taken with respect to the shared representation Z,
    which costs about one ordinary backward pass; with `mode="parameters"`
    they are taken with respect to the shared weights (the paper's exact
    "w/o approximation" variant, one backward per task).

    As in the authors' code, the normalisation changes alpha only: alpha is
    computed from the normalised gradients and then applied to the raw losses.
    Tasks whose gradient is exactly zero for a batch (for example all their
    sample weights are 0) are left out of the problem and get alpha = 0, so
    they cannot freeze the shared weights.

    Args:
        normalization: how each task gradient is scaled before the solve:
            `"l2"` (by its norm), `"loss"` (by its loss), `"loss+"` (by loss
            times norm; the authors' CelebA setting) or `"none"` (their
            MultiMNIST setting).
        mode: `"representation"` (MGDA-UB) or `"parameters"` (exact MGDA on
            the shared weights).
        head_update: `"scaled"` (each head gets alpha_t times its gradient, as
            the authors' code does) or `"full"` (each head gets its own full
            gradient, as the paper's Algorithm 2 writes).
        max_iters: Frank-Wolfe warm-start steps of the min-norm solver.
        tol: Frank-Wolfe tolerance of the min-norm solver (duality gap,
            relative to the largest squared gradient norm).
        epsilon: floor of every normalisation divisor.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Example:

    ```python
    weighting = keras_mgda.weighting.MGDA(normalization="l2")
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(
        self,
        normalization: Literal["loss+", "l2", "loss", "none"] = "loss+",
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "scaled",
        max_iters: int | None = None,
        tol: float | None = None,
        epsilon: float = 1e-12,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        solvers.check_normalization(normalization)
        self.normalization = normalization
        self.max_iters = max_iters
        self.tol = tol
        self.epsilon = epsilon

    def call(self, losses, gram=None, ops=keras.ops):
        divisors = solvers.normalization_divisors(
            gram, losses, self.normalization, epsilon=self.epsilon, ops=ops
        )
        normalized = solvers.normalize_gram(gram, divisors, ops=ops)
        # A task with an exactly zero gradient would be the min-norm point on
        # its own and stop the shared weights: leave it out instead.
        active = ops.diagonal(gram) > 0
        options = {}
        if self.max_iters is not None:
            options["max_iters"] = self.max_iters
        if self.tol is not None:
            options["tol"] = self.tol
        return solvers.min_norm(normalized, mask=active, ops=ops, **options)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "normalization": self.normalization,
                "max_iters": self.max_iters,
                "tol": self.tol,
                "epsilon": self.epsilon,
            }
        )
        return config
