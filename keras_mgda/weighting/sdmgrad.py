"""SDMGrad (Xiao, Ban & Ji, NeurIPS 2023): direction-oriented MGDA, solved
exactly on the Gram matrix."""

from typing import Literal

import keras

from keras_mgda import numerics as nx
from keras_mgda import solvers
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput

__all__ = ["SDMGrad", "shifted_gram"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class SDMGrad(GradientWeighting):
    """Stochastic direction-oriented multi-objective gradient descent.

    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple
    and Provable Stochastic Algorithms", NeurIPS 2023. MGDA's min-norm
    problem regularised towards the average gradient g0 = G^T 1 / T:

        w = argmin_{w in simplex} ||g_w||^2 / 2 + lambda g_w . g0,
        d = (g_w + lambda g0) / (1 + lambda),

    so lambda = 0 is MGDA and large lambda the average gradient. On the
    simplex the objective is ||sum_i w_i (g_i + lambda g0)||^2 / 2 up to a
    constant, so w is the minimum-norm point of the shifted gradients
    g_i + lambda g0, whose Gram matrix P M P^T (P = I + lambda 1 1^T / T)
    `keras_mgda.solvers.min_norm` solves exactly. The authors' code (and
    LibMTL, torchjd) approximate the same w by 20 steps of projected SGD
    with momentum, warm-started from the previous step's w (their only
    state); the exact solution needs no state. The weights are
    (w + lambda / T) / (1 + lambda), summing to 1.

    The paper's stochastic algorithm estimates the Gram matrix from two
    independent mini-batches and g0 from a third, to remove the bias of
    one batch; the train step has one batch, so here all three come from
    it: the deterministic direction-oriented update. The weights do not
    change when M is scaled. Task heads keep their plain gradients
    (`head_update="full"`), as in the authors' code. Where every gradient
    is zero the weights are 1/T.

    Zero gradients: a task whose gradient is exactly zero is left out
    (weight 0), and the problem is solved on the K others, g0 their mean,
    as MGDA and CR-MOGM leave such a task out. The method's own formula
    would keep it: its shifted gradient lambda g0 is the shortest, so it
    takes most of the weight (M = [[2, 0, .5], [0, 0, 0], [.5, 0, 1]] ->
    [0.077, 0.846, 0.077]) and the update shrinks to about
    lambda / (1 + lambda) g0, the zero gradient counting as a task that
    blocks every direction. The update is a convex combination of the
    task gradients, so at most max_t |g_t| long.

    Args:
        lambda_: the regularisation towards g0, >= 0 (default 0.3, the
            authors' experiments; their class default is 0.6).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights (w + lambda / T) / (1 + lambda).

    Example:

    ```python
    weighting = keras_mgda.weighting.SDMGrad(lambda_=0.3)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(
        self,
        lambda_: float = 0.3,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if not lambda_ >= 0 or lambda_ == float("inf"):
            raise ValueError(f"lambda_ must be finite and >= 0, got {lambda_!r}.")
        self.lambda_ = float(lambda_)

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        num_tasks = gram.num_tasks
        active = gram.active
        count = nx.maximum(ops.sum(ops.cast(active, gram.dtype)), gram.const(1.0), ops=ops)
        shifted = shifted_gram(gram.unit, self.lambda_, active=active, ops=ops)
        weights = solvers.min_norm(shifted, mask=active, ops=ops)
        weights = ops.where(active, (weights + self.lambda_ / count) / (1.0 + self.lambda_), 0.0)
        # Every gradient zero: any w is optimal; the symmetric one.
        return gram.finish(ops.where(ops.any(active), weights, 1.0 / num_tasks))

    def get_config(self):
        config = super().get_config()
        config["lambda_"] = self.lambda_
        return config


def shifted_gram(gram, lambda_, *, active=None, ops=keras.ops):
    """The Gram matrix of the shifted gradients g_i + lambda g0.

    Args:
        gram: (T, T) Gram matrix M of the gradients g_i.
        lambda_: the shift, a Python float.
        active: optional bool (T,): g0 is the mean of these tasks'
            gradients (default: all of them).
        ops: the namespace of array functions (default `keras.ops`).

    Returns:
        (T, T) matrix M_ij + lambda (m_i + m_j) + lambda^2 g0 . g0, with
        m = M a / K (m_i = g_i . g0), a the active tasks' indicator and K
        their number.

    Example:

    ```python
    s = shifted_gram(gram, 0.3)  # then keras_mgda.solvers.min_norm(s)
    ```
    """
    if active is None:
        members, count = gram, gram.shape[-1]
    else:
        members = ops.where(active[None, :], gram, nx.const(0.0, gram, ops=ops))
        count = nx.maximum(ops.sum(ops.cast(active, gram.dtype)), nx.const(1.0, gram, ops=ops), ops=ops)
    # Sums, not ops.mean: Keras's torch mean computes float64 in float32.
    mean = ops.sum(members, axis=-1) / count  # g_i . g0
    own = mean if active is None else ops.where(active, mean, nx.const(0.0, gram, ops=ops))
    g0_norm2 = nx.maximum(ops.sum(own) / count, nx.const(0.0, gram, ops=ops), ops=ops)
    return gram + lambda_ * (mean[:, None] + mean[None, :]) + (lambda_ * lambda_) * g0_norm2
