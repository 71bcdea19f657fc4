"""MoCo (Fernando et al., ICLR 2023): multi-objective gradient correction
with tracked per-task gradient estimates."""

from typing import Literal

import keras

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_state import GradientState
from keras_mgda.weighting._gradient_state import gradient_scale
from keras_mgda.weighting.extensions import GradientAggregator

__all__ = ["MoCo", "project_onto_simplex"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class MoCo(GradientState, GradientAggregator):
    """Multi-objective gradient correction.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR
    2023 (Algorithm 1). Stochastic MGDA is biased: its weights are solved
    from one batch's gradients. MoCo tracks an estimate y_t of each task's
    gradient of the shared weights and moves the weights lambda by one
    projected gradient step of MGDA's objective per training step:

        y_t <- y_t - beta_k (y_t - g_t),
        lambda <- Proj_simplex(lambda - gamma_k (Y Y^T + rho I) lambda),
        d = T sum_t lambda_t y_t,

    with beta_k = beta / (k + 1)^beta_decay, gamma_k likewise (k counts the
    steps from 0), y_t = 0 and lambda = 1/T at the start. This is the
    authors' code (their NYU-v2 trainer, `tracking`), including the factor
    T "to match the sum loss"; the paper's optional projection of y_t onto
    a ball is left out, as there. LibMTL's MoCo differs: it tracks
    g_t / ||g_t|| * L_t, replaces the simplex projection by a softmax and
    drops the factor T.

    The estimates y_t live in the shared weights' space, so MoCo needs
    `mode="parameters"` (estimates of dL_t/dZ would mix different
    examples from batch to batch) and its state holds T times the shared
    weights (created by the model before the first step, see
    `build_gradients`), plus lambda and the step count. Under mixed
    precision the loss scale is divided out of the tracked gradients and
    put back on the direction. The logged weights are T lambda. Task heads
    keep their plain gradients (`head_update="full"`), as in the authors'
    code.

    Args:
        beta: the tracking rate of y, in (0, 1] (default 0.99, the authors'
            NYU-v2 script; LibMTL's default is 0.5 with beta_decay 0.5).
        gamma: the step size of lambda, > 0 (default 0.1, both).
        beta_decay: the decay exponent of beta_k (default 0, the authors'
            script).
        gamma_decay: the decay exponent of gamma_k (default 0).
        rho: the l2 regularisation of lambda's step, >= 0 (default 0).
        mode: `"parameters"` only.
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get T lambda_t times their gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `aggregate`: the direction d (one tensor per shared weight)
        and the weights T lambda.

    Example:

    ```python
    weighting = keras_mgda.weighting.MoCo(beta=0.99, gamma=0.1)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(
        self,
        beta: float = 0.99,
        gamma: float = 0.1,
        beta_decay: float = 0.0,
        gamma_decay: float = 0.0,
        rho: float = 0.0,
        mode: Literal["representation", "parameters"] = "parameters",
        head_update: Literal["scaled", "full"] = "full",
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if mode != "parameters":
            raise ValueError(
                "MoCo tracks per-task gradients of the shared weights across steps: "
                "use mode='parameters' (gradients with respect to Z belong to "
                "different examples at every step)."
            )
        options = {"beta": beta, "gamma": gamma, "beta_decay": beta_decay, "gamma_decay": gamma_decay, "rho": rho}
        valid = {"beta": 0 < beta <= 1, "gamma": 0 < gamma < float("inf")}
        for name, value in options.items():
            if not valid.get(name, 0 <= value < float("inf")):
                raise ValueError(f"Invalid MoCo option {name}={value!r}.")
        self.beta, self.gamma = float(beta), float(gamma)
        self.beta_decay, self.gamma_decay = float(beta_decay), float(gamma_decay)
        self.rho = float(rho)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.lambdas = self.add_state("lambdas", (num_tasks,), initializer=keras.initializers.Constant(1.0 / num_tasks))
        self.steps = self.add_state("steps", ())

    def build_gradient_state(self, shapes):
        self.estimates = [
            self.add_state(f"estimates_{i}", (self.num_tasks,) + tuple(shape)) for i, shape in enumerate(shapes)
        ]

    def aggregate(self, gradients, losses, gram, ops=keras.ops):
        self.check_gradients(gradients)
        num_tasks = self.num_tasks
        scale = gradient_scale(gradients, gram, ops=ops)
        steps = self.steps.value + 1.0
        beta = self.beta / ops.power(steps, self.beta_decay)
        gamma = self.gamma / ops.power(steps, self.gamma_decay)
        tracked, products = [], ops.zeros((num_tasks, num_tasks), dtype="float32")
        for g, estimate in zip(gradients, self.estimates, strict=True):
            y = estimate.value - beta * (estimate.value - ops.cast(g, "float32") / scale)
            estimate.assign(y)
            tracked.append(y)
            flat = ops.reshape(y, (num_tasks, -1))
            products = products + ops.einsum("id,jd->ij", flat, flat)
        products = products + self.rho * ops.eye(num_tasks, dtype="float32")
        step = gamma * nx.matvec(products, self.lambdas.value, ops=ops)
        lambdas = project_onto_simplex(self.lambdas.value - step, ops=ops)
        self.lambdas.assign(lambdas)
        self.steps.assign(steps)
        weights = num_tasks * lambdas
        directions = [
            ops.cast(ops.tensordot(weights, y, axes=1) * scale, g.dtype)
            for g, y in zip(gradients, tracked, strict=True)
        ]
        return directions, weights

    def get_config(self):
        config = super().get_config()
        config.update({
            "beta": self.beta, "gamma": self.gamma, "beta_decay": self.beta_decay,
            "gamma_decay": self.gamma_decay, "rho": self.rho,
        })
        return config


def project_onto_simplex(v, *, ops=keras.ops):
    """The Euclidean projection of v (T,) onto {x >= 0, sum(x) = 1}.

    The sort-based algorithm (Duchi et al., 2008), as the authors' code,
    after shifting v so that its largest entry is 0 (the projection is the
    same; without the shift, entries of 1e15 round the simplex's sum away):
    with u = v sorted in decreasing order, rho the largest j with
    u_j > (sum_{i <= j} u_i - 1) / j, and theta = (sum_{i <= rho} u_i - 1)
    / rho, the projection is max(v - theta, 0).

    Args:
        v: (T,) tensor.
        ops: the namespace of array functions.

    Returns:
        (T,) tensor on the simplex.

    Example:

    ```python
    project_onto_simplex(keras.ops.convert_to_tensor([0.7, 0.5, -0.2]))  # [0.6, 0.4, 0.]
    ```
    """
    num_tasks = v.shape[-1]
    dtype = nx.float_dtype(v)
    # The projection commutes with a shift: from the largest entry at 0,
    # entries far below it (a step of 1e15) do not swamp the sum's 1.
    v = v - ops.max(v)
    u = -ops.sort(-v)  # decreasing
    index = ops.arange(num_tasks, dtype=dtype) + 1.0
    # Cumulative sums as a triangular product (ops.cumsum is missing in
    # some namespaces), exact enough for T of tens.
    lower = ops.cast(index[:, None] >= index[None, :], dtype)
    cumulative = ops.sum(lower * u[None, :], axis=-1) - 1.0
    condition = u - cumulative / index > 0
    rho = ops.sum(ops.cast(condition, "int32"))
    theta = ops.take(cumulative, rho - 1) / ops.cast(rho, dtype)
    return nx.maximum(v - theta, nx.const(0.0, v, ops=ops), ops=ops)
