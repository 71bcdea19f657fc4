"""UPGrad (Quinton & Rey, 2024): the mean of the task gradients, each
projected onto the dual cone of all task gradients."""

import keras
import numpy as np
from keras import ops

from keras_mgda import solvers
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput

# A bound joins the free set when its gradient is below zero by more than
# JOIN_NOISE times the rounding noise of that gradient (as in min_norm).
JOIN_NOISE = 16.0


@keras.saving.register_keras_serializable(package="keras_mgda")
class UPGrad(GradientWeighting):
    """Unconflicting projection of gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
    (arXiv:2406.16232; the torchjd library). Each task gradient g_i is
    projected onto the dual cone {x : g_j . x >= 0 for all j} of the task
    gradients, and the shared weights follow the mean of the projections.
    By the paper's Proposition 1 the projection of g_i is sum_k w_ik g_k with

        w_i = argmin_{w >= e_i} w^T M w,

    a small quadratic program on the Gram matrix M. It is solved here, for
    all i at once, by an exact primal active-set method (the one of
    `keras_mgda.solvers.min_norm`, for bound constraints): proximal KKT
    solves on the free set, exact line search, and a stop when the KKT
    conditions hold to rounding noise. The weights are the mean of the w_i.

    The direction sum_k w_k g_k conflicts with no task: M w >= 0, so to first
    order no task loss increases. Scaling M changes nothing (the weights are
    scale invariant), and tasks whose gradient is exactly zero keep weight
    1/T with no effect. Task heads keep their plain gradients
    (`head_update="full"`), as in torchjd's `mtl_backward`.

    Args:
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        max_rounds: cap on the active-set rounds; None for 2 T + 16.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, the mean over i of the coefficients
        of the projection of g_i. Without conflicts they are all 1/T.

    Example:

    ```python
    weighting = keras_mgda.weighting.UPGrad()
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(self, mode="representation", head_update="full", max_rounds=None, **kwargs):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.max_rounds = max_rounds

    def call(self, losses, gram=None):
        gram = GramInput(gram)
        num_tasks = gram.num_tasks
        lower = ops.eye(num_tasks, dtype=gram.dtype)
        max_rounds = 2 * num_tasks + 16 if self.max_rounds is None else int(self.max_rounds)
        projected = project_onto_dual_cone(gram.unit, lower, max_rounds=max_rounds)
        return gram.finish(ops.mean(projected, axis=0))

    def get_config(self):
        config = super().get_config()
        config["max_rounds"] = self.max_rounds
        return config


def project_onto_dual_cone(gram, lower, max_rounds=None):
    """Weights of projections onto the dual cone of the task gradients.

    Solves, for each row u of `lower` (batched), the convex quadratic program

        minimise  w^T M w   subject to   w >= u,

    whose solution gives the projection of sum_k u_k g_k onto the dual cone
    {x : g_j . x >= 0 for all j} as sum_k w_k g_k (Quinton & Rey 2024,
    Proposition 1, for u >= 0). KKT conditions: w >= u, M w >= 0 and
    (w - u)_j (M w)_j = 0.

    Primal active-set method: each round solves the KKT system on the free
    set (tasks with w_j > u_j) exactly, with a vanishing proximal term (so
    singular M stays solvable), extends the step by exact line search, cuts
    it where the first free weight reaches its bound (which leaves the free
    set), then frees every bound whose gradient (M w)_j is negative beyond
    rounding noise. Done when the proximal pull is below rounding noise.

    Args:
        gram: (T, T) positive semi-definite Gram matrix, max diagonal ~ 1.
        lower: (B, T) lower bounds u.
        max_rounds: cap on the rounds (default 2 T + 16).

    Returns:
        (B, T) weights w.
    """
    gram = ops.convert_to_tensor(gram)
    dtype = solvers._float_dtype(gram)
    gram = ops.cast(gram, dtype)
    lower = ops.cast(ops.convert_to_tensor(lower), dtype)
    num_tasks = gram.shape[-1]
    eps = float(np.finfo(dtype).eps)
    delta = float(np.sqrt(eps))
    if max_rounds is None:
        max_rounds = 2 * num_tasks + 16
    # Work in y = s * w with s_j = |g_j|, where the matrix C = M / (s s^T)
    # has a unit diagonal: the proximal term delta * I is then relative to
    # each task's own scale, however tiny (floored only for zero gradients,
    # whose rows of C are then 0).
    diag = ops.diagonal(gram)
    scale = ops.sqrt(solvers._maximum(diag, solvers._const(np.finfo(dtype).tiny, gram)))
    unit = gram / scale[:, None] / scale[None, :]
    abs_unit = ops.abs(unit)
    eye = ops.eye(num_tasks, dtype=dtype)
    bound = lower * scale

    def products(y):
        """C y and the rounding noise of each entry."""
        return ops.matmul(y, unit), eps * ops.matmul(ops.abs(y), abs_unit)

    def cond(y, grad, noise, free, done):
        return ~ops.all(done)

    def body(y, grad, noise, free, done):
        free_f = ops.cast(free, dtype)
        # Proximal KKT system on the free set F, identity rows elsewhere:
        # (C_FF + delta I) t_F = -C_FB y_B + delta y_F, t_B = y_B.
        system = unit[None, :, :] * free_f[:, :, None] * free_f[:, None, :]
        system = system + eye[None, :, :] * ops.where(free, delta, 1.0)[:, :, None]
        fixed_part = ops.matmul(y * (1.0 - free_f), unit)
        rhs = ops.where(free, delta * y - fixed_part, y)
        target = ops.solve(system, rhs[:, :, None])[:, :, 0]
        direction = ops.where(free, target - y, 0.0)
        settled = ops.all(delta * ops.abs(direction) <= noise, axis=-1)

        # Exact line search (the proximal step undershoots along weakly
        # curved directions); where the curvature is lost in rounding, the
        # objective is flat: go to the boundary.
        unit_direction = ops.matmul(direction, unit)
        slope = ops.sum(grad * direction, axis=-1)
        curvature = ops.sum(unit_direction * direction, axis=-1)
        curved = curvature > 16.0 * eps * ops.square(ops.sum(ops.abs(direction), axis=-1))
        descent = (slope < 0) & ~settled
        length = ops.where(
            curved,
            solvers._maximum(-slope / ops.where(curved, curvature, 1.0), solvers._const(1.0, gram)),
            1.0 / eps,
        )
        length = ops.where(descent, length, 1.0)[:, None]
        # Ratio test: stop where the first free weight reaches its bound.
        shrinking = free & (direction < 0)
        ratio = ops.where(
            shrinking, (y - bound) / ops.where(shrinking, -direction, 1.0), np.inf
        )
        step = solvers._minimum(ops.min(ratio, axis=-1, keepdims=True), length)
        blocked = shrinking & (ratio <= step)
        moved = y + step * direction
        moved = ops.where(blocked | (moved < bound), bound, moved)
        at_line_minimum = ~ops.any(blocked, axis=-1)
        failed = ~ops.all(ops.isfinite(moved), axis=-1)
        moved = ops.where(failed[:, None], y, moved)

        grad_moved, noise_moved = products(moved)
        kept = free & ~blocked
        joining = ~kept & (grad_moved + JOIN_NOISE * noise_moved < 0) & at_line_minimum[:, None]
        now_done = (settled & at_line_minimum & ~ops.any(joining, axis=-1)) | failed

        def update(new, old):
            return ops.where(done[:, None], old, new)

        return (
            update(moved, y),
            update(grad_moved, grad),
            update(noise_moved, noise),
            update(kept | joining, free),
            done | now_done,
        )

    grad, noise = products(bound)
    free = grad + JOIN_NOISE * noise < 0
    done = ~ops.any(free, axis=-1)
    y, _, _, _, _ = ops.while_loop(
        cond, body, (bound, grad, noise, free, done), maximum_iterations=max_rounds
    )
    return y / scale
