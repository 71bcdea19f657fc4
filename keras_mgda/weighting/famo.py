"""FAMO (Liu, Feng, Stone & Liu, NeurIPS 2023): weights learned from
how fast each loss falls, with its own Adam on the logits."""

from collections.abc import Mapping
from collections.abc import Sequence

import keras
from keras import ops

from keras_mgda.weighting.base import per_task_values
from keras_mgda.weighting.extensions import AfterUpdateHook

__all__ = [
    "FAMO",
]

# torch.optim.Adam's defaults, which the authors' code uses for the logits.
BETA_1 = 0.9
BETA_2 = 0.999
ADAM_EPSILON = 1e-8


@keras.saving.register_keras_serializable(package="keras_mgda")
class FAMO(AfterUpdateHook):
    """Fast adaptive multitask optimization.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask
    Optimization", NeurIPS 2023. FAMO decreases every task's loss at about
    the same rate, from the losses alone. With learnable logits xi and
    z = softmax(xi), the update follows

        sum_t (z_t / c) log(L_t - b_t + epsilon),   c = sum_t z_t / (L_t - b_t + epsilon)

    (c held constant), so the weight of task t is
    w_t = (z_t / D_t) / sum_s (z_s / D_s) with D_t = L_t - b_t + epsilon:
    positive, summing to 1. After each step the same batch's losses are
    evaluated again (`AfterUpdateHook`: the step pays one more forward
    pass, in training mode as in the authors' code, so dropout and
    BatchNorm act alike in both losses), and the logits take one Adam
    step on

        grad = J_softmax(xi)^T delta + weight_decay * xi,
        delta_t = log(D_t before the update) - log(D_t after it),

    which lowers the weight of the tasks whose loss fell the most. The
    Adam step is FAMO's own, as in the authors' code (torch's `Adam`, with
    its L2 `weight_decay`, betas (0.9, 0.999) and epsilon 1e-8), written
    in `keras.ops` on state variables (the logits, both moments and the
    step count), so it runs inside the compiled step and is saved and
    resumed with the model. A step that is skipped, or whose loss change
    is not finite, leaves that state unchanged.

    The authors clip the shared parameters' gradient norm to `max_norm`
    (1.0) in their standalone `famo.py`; it is left out here (a weighting
    sets task weights, not the update's norm): give the optimizer
    `clipnorm=1.0` for the same effect on the whole model.

    Degenerate losses: a task whose loss is within `epsilon` of its bound
    is solved (its log gap is -inf) and gets weight 0 for the step, the
    others sharing the weight as usual; in the authors' code its weight
    1 / epsilon takes all of it (every other task's weight ~1e-8). The
    weights are on the simplex, so the update is at most max_t |g_t|.

    Args:
        learning_rate: the logits' Adam learning rate (0.025, the paper and
            the authors' code).
        weight_decay: the logits' L2 regularisation, gamma in the paper
            (1e-3, the authors' setting for NYUv2, CelebA and QM9 and
            LibMTL's default; they use 1e-2 for Cityscapes).
        min_losses: the lower bounds b_t of the losses (default 0), a list
            in task order or a dict keyed by task name. Every loss must stay
            above its bound: a loss below it gives NaN weights.
        epsilon: added to L_t - b_t before the logarithm (1e-8, the
            authors').
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, positive, summing to 1.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.FAMO())
    ```
    """

    def __init__(
        self,
        learning_rate: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: Sequence[float] | Mapping[str, float] | None = None,
        epsilon: float = 1e-8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not learning_rate >= 0 or not weight_decay >= 0:
            raise ValueError(
                f"learning_rate and weight_decay must be >= 0; got {learning_rate!r} and {weight_decay!r}."
            )
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.min_losses = None if min_losses is None else (
            dict(min_losses) if isinstance(min_losses, dict) else [float(b) for b in min_losses]
        )
        self.epsilon = float(epsilon)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        bounds = [0.0] * num_tasks if self.min_losses is None else per_task_values(
            self.min_losses, num_tasks, task_names, "min_losses"
        )
        self._bounds = [float(b) for b in bounds]
        self.logits = self.add_state("logits", (num_tasks,))
        self.first_moment = self.add_state("first_moment", (num_tasks,))
        self.second_moment = self.add_state("second_moment", (num_tasks,))
        self.adam_steps = self.add_state("adam_steps", ())

    def _log_gaps(self, losses):
        """log(L - b + epsilon), NaN below the bound."""
        gaps = ops.cast(losses, "float32") - ops.convert_to_tensor(self._bounds, "float32")
        return ops.log(ops.where(gaps >= 0, gaps + self.epsilon, float("nan")))

    def call(self, losses, gram=None):
        logs = self._log_gaps(losses)
        # A solved task (L - b <= epsilon): weight 0 rather than all of it.
        solved = ops.cast(losses, "float32") - ops.convert_to_tensor(self._bounds, "float32") <= self.epsilon
        ratio = ops.where(solved, 0.0, ops.softmax(ops.convert_to_tensor(self.logits)) * ops.exp(-logs))
        total = ops.sum(ratio)
        weights = ratio / ops.where(total > 0, total, 1.0)
        # An infinite loss would get weight 0: NaN instead, as for NaN.
        return ops.where(ops.all(ops.isfinite(logs)), weights, float("nan"))

    def after_update(self, losses, new_losses):
        delta = self._log_gaps(losses) - self._log_gaps(new_losses)
        logits = ops.convert_to_tensor(self.logits)
        z = ops.softmax(logits)
        # J^T delta for the softmax's (symmetric) Jacobian diag(z) - z z^T.
        grad = z * (delta - ops.sum(z * delta)) + self.weight_decay * logits
        steps = ops.convert_to_tensor(self.adam_steps) + 1.0
        first = ops.convert_to_tensor(self.first_moment)
        first = first + (1.0 - BETA_1) * (grad - first)  # torch's lerp
        second = BETA_2 * ops.convert_to_tensor(self.second_moment) + (1.0 - BETA_2) * ops.square(grad)
        step_size = self.learning_rate / (1.0 - ops.power(BETA_1, steps))
        denominator = ops.sqrt(second) / ops.sqrt(1.0 - ops.power(BETA_2, steps)) + ADAM_EPSILON
        moved = logits - step_size * first / denominator
        ok = ops.all(ops.isfinite(grad))
        for variable, value in (
            (self.logits, moved),
            (self.first_moment, first),
            (self.second_moment, second),
            (self.adam_steps, steps),
        ):
            variable.assign(ops.where(ok, value, ops.convert_to_tensor(variable)))

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "min_losses": self.min_losses,
            "epsilon": self.epsilon,
        }
