"""ConFIG (Liu, Chu & Thuerey, ICLR 2025): conflict-free inverse gradients,
written on the Gram matrix."""

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Literal

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._preferences import check_preferences
from keras_mgda.weighting._preferences import resolve_preferences

__all__ = ["ConFIG", "conflict_free_weights"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class ConFIG(GradientWeighting):
    """Conflict-free inverse gradients.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025 (Eq. 2). With U the matrix of the
    unit task gradients u_i = g_i / ||g_i|| (rows) and p the preferences
    (ones by default), the direction g_u = U^+ p / ||U^+ p|| has the same
    cosine with every task (for independent gradients) and the update is

        g_ConFIG = (sum_i g_i . g_u) g_u.

    Everything here is a function of the Gram matrix M alone: U^+ = U^T
    (U U^T)^+ and U U^T = C, the Gram matrix of the unit gradients
    (C_ij = M_ij / (||g_i|| ||g_j||)), so U^+ p = sum_i beta_i u_i with
    beta = C^+ p; ||U^+ p||^2 = beta^T C beta, and
    sum_j g_j . u_i = sum_j ||g_j|| C_ji. The weights of the task gradients
    are therefore

        w_i = (beta_i / ||g_i||) (sum_j ||g_j|| (C beta)_j) / (beta^T C beta),

    invariant to scaling M. The pseudo-inverse C^+ is taken from C's
    eigendecomposition, keeping the eigenvalues above max(eig) T eps. That
    resolves U's singular values down to sqrt(T eps) times the largest
    (C's entries carry rounding of order eps), where the authors' code and
    torchjd, which take the pseudo-inverse of U itself, resolve them to
    about eps: the results agree wherever the unit gradients are not
    nearly dependent (singular values more than ~3e-4 of the largest in
    float32), and differ by design on nearly (not exactly) dependent ones.

    Tasks whose gradient is exactly zero are left out (u_i = 0, as the
    authors' code sets it, weight 0). Where U^+ p vanishes (the unit
    gradients, weighted by p, sum to zero) or every gradient is zero, the
    update is zero: weights 0, as in the authors' code. Task heads keep
    their plain gradients (`head_update="full"`), as in torchjd's
    `mtl_backward`.

    Args:
        preferences: None (ones), or one positive value per task (a list in
            task order or a dict keyed by output name): the vector p (the
            authors' `weight_model`, torchjd's `pref_vector`). Only its
            direction matters.
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights w, g_ConFIG = sum_i w_i g_i. For
        orthogonal gradients and p = 1 they are all 1.

    Example:

    ```python
    weighting = keras_mgda.weighting.ConFIG()
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    # Not solved on the host, as Aligned-MTL: NumPy's eigendecomposition
    # starts OpenBLAS threads that compete with torch's for the step.
    host_solvable = False

    def __init__(
        self,
        preferences: Sequence[float] | Mapping[str, float] | None = None,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.preferences = check_preferences(preferences)
        self._resolved = None

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self._resolved = resolve_preferences(self.preferences, num_tasks, task_names, 1.0)

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        resolved = self._resolved
        if resolved is None or len(resolved) != gram.num_tasks:
            resolved = resolve_preferences(self.preferences, gram.num_tasks, None, 1.0)
        preferences = ops.convert_to_tensor(resolved, dtype=gram.dtype)
        return gram.finish(conflict_free_weights(gram, preferences))

    def get_config(self):
        config = super().get_config()
        config["preferences"] = self.preferences
        return config


def conflict_free_weights(gram, preferences):
    """ConFIG's weights for a `GramInput` and (T,) positive preferences."""
    ops = gram.ops
    num_tasks = gram.num_tasks
    active = gram.active
    norms = gram.norms()  # 1 for inactive tasks
    pair = active[:, None] & active[None, :]
    corr = ops.where(pair, gram.correlation(), 0.0)  # zero rows: u_i = 0
    values, vectors = ops.eigh(corr)
    kept = values > ops.max(values) * num_tasks * gram.eps
    inverse = ops.where(kept, 1.0 / ops.where(kept, values, 1.0), 0.0)
    preferences = ops.where(active, preferences, 0.0)
    # beta = C^+ p, with sums (Keras's torch matmul computes float64 in float32).
    beta = nx.matvec(vectors, inverse * nx.matvec(ops.transpose(vectors), preferences, ops=ops), ops=ops)
    c_beta = nx.matvec(corr, beta, ops=ops)
    norm2 = nx.dot(beta, c_beta, ops=ops)  # ||U^+ p||^2
    length = ops.sum(ops.where(active, norms, 0.0) * c_beta)
    regular = norm2 > 0
    factor = length / ops.where(regular, norm2, 1.0)
    weights = ops.where(active & regular, beta / norms * factor, 0.0)
    return ops.where(ops.all(ops.isfinite(weights)), weights, np.nan)
