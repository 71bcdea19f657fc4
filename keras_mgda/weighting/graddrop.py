"""GradDrop (Chen et al., NeurIPS 2020): gradient sign dropout on the
per-task gradients."""

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Literal

import keras

from keras_mgda.weighting.base import per_task_values
from keras_mgda.weighting.extensions import GradientAggregator

__all__ = ["GradDrop", "sign_dropout"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class GradDrop(GradientAggregator):
    """Gradient sign dropout.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020 (Algorithm 1). At every element of the shared
    representation (or of a shared weight) the positive sign purity of the
    task gradients,

        P = (1 + sum_t G_t / sum_t |G_t|) / 2,

    decides, against a uniform draw U of the same shape, which sign
    survives: task t keeps its gradient where f(P) > U and G_t > 0, or
    f(P) < U and G_t < 0 (f the identity, as in the paper's experiments),
    and the update is sum_t (l_t + (1 - l_t) M_t) * g_t with the leak l_t.
    The masks act elementwise on the gradients themselves, so GradDrop is a
    `GradientAggregator`, not a weighting of the Gram matrix.

    In `mode="representation"` (the default: the paper applies GradDrop at
    the last shared layer) the gradients dL_t/dZ are batch-separated, and,
    as in the paper and LibMTL, the purity is computed from their sums over
    the batch, G_t = sum_batch sign(Z) * dL_t/dZ, and each mask is applied
    to every example. The train step does not pass Z to the aggregator
    today: without it sign(Z) is taken as 1, exact wherever Z > 0 (e.g. a
    sigmoid or softplus representation) and the batch sum of dL_t/dZ
    otherwise; `aggregate(..., representation=z)` uses the real signs. In
    `mode="parameters"` the masks act on each shared weight's gradients
    element by element, as torchjd's `GradDrop` does on the Jacobian.

    The draws come from a `keras.random.SeedGenerator` the model tracks.
    Where every task gradient is zero, P is 1/2 (nothing to keep). The
    logged weight of task t is the share of its squared gradient that
    survives, sum (l_t + (1 - l_t) M_t) g_t^2 / sum g_t^2 (1 for a zero
    gradient). Task heads keep their plain gradients (`head_update="full"`),
    as in the paper, where GradDrop sits below the heads.

    Args:
        leak: the leak l_t in [0, 1]: one float for every task, or one per
            task (a list in task order or a dict keyed by output name);
            default 0 (pure GradDrop, the paper's and LibMTL's default).
        mode: `"representation"` (masks on dL_t/dZ, the paper) or
            `"parameters"` (masks on the shared weights' gradients).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task's logged weight times their gradient).
        seed: int or None, seed of the uniform draws.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `aggregate`: the masked sum of the gradients, and the weights
        above.

    Example:

    ```python
    weighting = keras_mgda.weighting.GradDrop(seed=0)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(
        self,
        leak: float | Sequence[float] | Mapping[str, float] = 0.0,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.leak = _check_leak(leak)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._resolved = None

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self._resolved = self._leaks(num_tasks, task_names)

    def _leaks(self, num_tasks, task_names):
        if isinstance(self.leak, float):
            return [self.leak] * num_tasks
        return [float(v) for v in per_task_values(self.leak, num_tasks, task_names, "leak")]

    def aggregate(self, gradients, losses, gram, ops=keras.ops, representation=None):
        num_tasks = gradients[0].shape[0]
        resolved = self._resolved
        if resolved is None or len(resolved) != num_tasks:
            resolved = self._leaks(num_tasks, None)
        leak = ops.convert_to_tensor(resolved, dtype="float32")
        batched = self.mode == "representation"
        signs = None if representation is None else ops.sign(representation)
        directions, kept, total = [], 0.0, 0.0
        for g in gradients:
            direction, share = sign_dropout(g, leak, self.seed_generator, batched, signs, ops=ops)
            directions.append(direction)
            kept = kept + share
            total = total + ops.sum(ops.reshape(ops.square(ops.cast(g, "float32")), (num_tasks, -1)), axis=-1)
        weights = ops.where(total > 0, kept / ops.where(total > 0, total, 1.0), 1.0)
        return directions, weights

    def get_config(self):
        config = super().get_config()
        config.update({"leak": self.leak, "seed": self.seed})
        return config


def _check_leak(leak):
    """The leak as stored in the config: a float, a list or a dict of
    floats, each in [0, 1]."""
    if isinstance(leak, dict):
        checked = {str(k): float(v) for k, v in leak.items()}
        values = list(checked.values())
    elif isinstance(leak, (list, tuple)):
        checked = values = [float(v) for v in leak]
    else:
        checked = float(leak)
        values = [checked]
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"leak must be in [0, 1] (one value, or one per task), got {leak!r}.")
    return checked


def sign_dropout(gradients, leak, seed, batched, signs=None, *, ops=keras.ops):
    """GradDrop on one (T, ...) tensor of per-task gradients.

    Args:
        gradients: (T, ...) per-task gradients; with `batched`, (T, B, ...)
            batch-separated gradients whose masks are shared by the batch.
        leak: (T,) float32 leaks.
        seed: a `keras.random.SeedGenerator` (or an int) for the draws.
        batched: whether axis 1 is a batch axis to sum over.
        signs: optional sign(Z), (B, ...), for batched gradients.
        ops: the namespace of array functions.

    Returns:
        `(direction, kept)`: the masked sum of the gradients, shaped like
        one task's, and (T,) float32 sum (l_t + (1 - l_t) M_t) g_t^2.
    """
    num_tasks = gradients.shape[0]
    g32 = ops.cast(gradients, "float32")
    purity_input = g32 if signs is None else g32 * ops.cast(signs, "float32")[None]
    summed = ops.sum(purity_input, axis=1) if batched else purity_input
    absolute = ops.sum(ops.abs(summed), axis=0)
    balance = ops.sum(summed, axis=0) / ops.where(absolute > 0, absolute, 1.0)
    purity = ops.where(absolute > 0, 0.5 * (1.0 + balance), 0.5)
    draws = keras.random.uniform(purity.shape, seed=seed)
    masks = ((purity > draws)[None] & (summed > 0)) | ((purity < draws)[None] & (summed < 0))
    leak = ops.reshape(leak, (num_tasks,) + (1,) * (len(summed.shape) - 1))
    keep = leak + (1.0 - leak) * ops.cast(masks, "float32")
    if batched:
        keep = keep[:, None]
    kept = ops.sum(ops.reshape(keep * ops.square(g32), (num_tasks, -1)), axis=-1)
    direction = ops.sum(ops.cast(keep, gradients.dtype) * gradients, axis=0)
    return direction, kept
