"""ExcessMTL (He et al., ICML 2024): task weights driven by each
task's estimated excess risk."""

from typing import Literal

import keras

from keras_mgda.weighting._gradient_state import GradientState
from keras_mgda.weighting._gradient_state import gradient_scale
from keras_mgda.weighting.extensions import GradientAggregator

__all__ = ["ExcessMTL"]

# Added under the square root of the accumulated squared gradients, as in
# the authors' code (in the units of the loss's gradients).
ADAGRAD_EPSILON = 1e-7


@keras.saving.register_keras_serializable(package="keras_mgda")
class ExcessMTL(GradientState, GradientAggregator):
    """Robust multi-task learning with excess risks.

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task
    Learning with Excess Risks", ICML 2024. Each task's excess risk (its loss above its Bayes-optimal
    loss) is estimated to second order as g_t^T H_t^-1 g_t (Eq. 6), with
    the diagonal AdaGrad approximation H_t = diag(sqrt(sum over steps of
    g_t^2 + 1e-7)) (Eq. 7): this needs the elementwise squares of the
    gradients accumulated over steps, so it is not a function of the Gram
    matrix, and the method keeps one sum of squared gradients per task,
    shaped like the gradients. The task weights follow an exponentiated
    gradient step on the excess risks, normalised by their values at the
    first step ("scale processing"),

        w <- w exp(eta E_t / E_t(first)),   w <- T w / sum(w),

    as in the authors' code: weights start at 1, the first step only
    records E(first), and the update is sum_t w_t G_t, i.e. the model
    follows sum_t w_t L_t (shared weights and heads alike:
    `head_update="scaled"`). Kept as log-weights, so a weight never
    overflows. A task whose gradient was zero at the first step has no
    baseline: its excess risk ratio counts as 0.

    The gradients are the shared weights' (`mode="parameters"`, the
    default, as the authors' code): the state then holds T times the
    shared weights. With `mode="representation"` they are dL_t/dZ summed
    over the batch, as the authors' code (LibMTL's `rep_grad`) does, and
    the state is T times Z's shape; the gradients are then the local
    batch's, so use parameters mode with several replicas. Under mixed
    precision the loss scale is divided out before the squares are
    accumulated.

    Args:
        robust_step_size: eta, > 0 (default 1e-2, the authors' code).
        mode: `"parameters"` (gradients with respect to the shared weights)
            or `"representation"` (batch sums of dL_t/dZ).
        head_update: `"scaled"` (heads get w_t times their gradient, the
            authors' loss weighting) or `"full"` (their own gradients).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `aggregate`: the direction sum_t w_t G_t and the weights w
        (summing to T).

    Example:

    ```python
    weighting = keras_mgda.weighting.ExcessMTL(robust_step_size=1e-2)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(
        self,
        robust_step_size: float = 1e-2,
        mode: Literal["representation", "parameters"] = "parameters",
        head_update: Literal["scaled", "full"] = "scaled",
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        if not 0 < robust_step_size < float("inf"):
            raise ValueError(f"robust_step_size must be finite and > 0, got {robust_step_size!r}.")
        self.robust_step_size = float(robust_step_size)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.log_weights = self.add_state("log_weights", (num_tasks,))
        self.baseline = self.add_state("baseline", (num_tasks,))
        self.steps = self.add_state("steps", ())

    def build_gradient_state(self, shapes):
        if self.mode == "representation":
            if len(shapes) != 1 or any(d is None for d in shapes[0][1:]):
                raise ValueError(
                    f"ExcessMTL in representation mode needs Z's per-example shape, got {list(shapes)}."
                )
            shapes = [shapes[0][1:]]  # summed over the batch
        self.squared_sums = [
            self.add_state(f"squared_sums_{i}", (self.num_tasks,) + tuple(shape))
            for i, shape in enumerate(shapes)
        ]

    def aggregate(self, gradients, losses, gram, ops=keras.ops):
        self.check_gradients(gradients)
        scale = gradient_scale(gradients, gram, ops=ops)
        risks = None
        for g, sums in zip(gradients, self.squared_sums, strict=True):
            g = ops.cast(g, "float32") / scale
            if self.mode == "representation":
                g = ops.sum(g, axis=1)
            squares = ops.square(g)
            total = sums.value + squares
            sums.assign(total)
            part = ops.sum(ops.reshape(squares / ops.sqrt(total + ADAGRAD_EPSILON), (g.shape[0], -1)), axis=-1)
            risks = part if risks is None else risks + part
        weights = self._update_weights(risks, ops)
        directions = [ops.tensordot(ops.cast(weights, g.dtype), g, axes=1) for g in gradients]
        return directions, weights

    def _update_weights(self, risks, ops):
        """The exponentiated step on the risks relative to the first step's
        (recorded at the first step, which keeps the weights)."""
        first = self.steps.value == 0
        baseline = ops.where(first, risks, self.baseline.value)
        ratio = ops.where(baseline > 0, risks / ops.where(baseline > 0, baseline, 1.0), 0.0)
        log_weights = self.log_weights.value + ops.where(first, 0.0, self.robust_step_size * ratio)
        log_weights = log_weights - ops.max(log_weights)  # the weights' ratios are what counts
        self.baseline.assign(baseline)
        self.log_weights.assign(log_weights)
        self.steps.assign(self.steps.value + 1.0)
        exp = ops.exp(log_weights)
        return exp * (risks.shape[0] / ops.sum(exp))

    def get_config(self):
        config = super().get_config()
        config["robust_step_size"] = self.robust_step_size
        return config
