"""UPGrad (Quinton & Rey, 2024): the mean of the task gradients, each
projected onto the dual cone of all task gradients."""

from typing import Literal

import keras

from keras_mgda import numerics as nx
from keras_mgda.active_set import active_set_qp
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput

__all__ = ["UPGrad", "project_onto_dual_cone"]


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
    all i at once, by the exact active-set method of `keras_mgda.active_set`
    (the one `keras_mgda.solvers.min_norm` polishes with, for bound
    constraints): proximal KKT solves on the free set, exact line search,
    and a stop when the KKT conditions hold to rounding noise. The weights
    are the mean of the w_i.

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

    def __init__(
        self,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        max_rounds: int | None = None,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.max_rounds = max_rounds

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        lower = ops.eye(gram.num_tasks, dtype=gram.dtype)
        max_rounds = None if self.max_rounds is None else int(self.max_rounds)
        projected = project_onto_dual_cone(gram.unit, lower, max_rounds, ops=ops)
        # A sum, not ops.mean: Keras's torch mean computes float64 in float32.
        return gram.finish(ops.sum(projected, axis=0) / gram.num_tasks)

    def get_config(self):
        config = super().get_config()
        config["max_rounds"] = self.max_rounds
        return config


def project_onto_dual_cone(gram, lower, max_rounds=None, *, ops=keras.ops):
    """Weights of projections onto the dual cone of the task gradients.

    Solves, for each row u of `lower` (batched), the convex quadratic program

        minimise  w^T M w   subject to   w >= u,

    whose solution gives the projection of sum_k u_k g_k onto the dual cone
    {x : g_j . x >= 0 for all j} as sum_k w_k g_k (Quinton & Rey 2024,
    Proposition 1, for u >= 0). KKT conditions: w >= u, M w >= 0 and
    (w - u)_j (M w)_j = 0. Solved by the exact active-set method of
    `keras_mgda.active_set` (bounds only). Where M is singular the
    minimiser is not unique; the method stays at the one it reaches from u
    by proximal steps, which keeps the weights of the order of u.

    Args:
        gram: (T, T) positive semi-definite Gram matrix, max diagonal ~ 1.
        lower: (B, T) lower bounds u.
        max_rounds: cap on the rounds (default 2 T + 16).
        ops: the namespace of array functions (default `keras.ops`).

    Returns:
        (B, T) weights w.

    Example:

    ```python
    w = project_onto_dual_cone(gram, keras.ops.eye(3))  # each g_i projected
    ```
    """
    gram = ops.convert_to_tensor(gram)
    dtype = nx.float_dtype(gram)
    gram = ops.cast(gram, dtype)
    lower = ops.cast(ops.convert_to_tensor(lower), dtype)
    num_tasks = gram.shape[-1]
    if max_rounds is None:
        max_rounds = 2 * num_tasks + 16
    return active_set_qp(gram, lower, lower, simplex=False, max_rounds=max_rounds, ops=ops)
