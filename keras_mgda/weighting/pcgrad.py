"""PCGrad (Yu et al., NeurIPS 2020): gradient surgery, written on the Gram
matrix."""

from typing import Literal

import keras

from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput

__all__ = ["PCGrad", "surgery"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class PCGrad(GradientWeighting):
    """Projecting conflicting gradients ("gradient surgery").

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020. Each task gradient g_i is projected,
    task after task in a random order, onto the normal plane of every other
    task gradient g_j it conflicts with (g_i^PC . g_j < 0):

        g_i^PC <- g_i^PC - (g_i^PC . g_j / |g_j|^2) g_j,

    and the shared weights follow the sum of the projected gradients. Every
    g_i^PC stays a linear combination of the task gradients, so the surgery
    is carried out on coefficient vectors with the Gram matrix alone, and the
    weight of task k is the sum over i of the coefficient of g_k in g_i^PC.
    Without conflicts every weight is 1 (the gradient of the sum of losses).

    The random order is drawn once per step and shared by all tasks, as in
    the authors' TensorFlow code (`tf.random.shuffle` of the task list), from
    a `keras.random.SeedGenerator` that the model tracks. Task heads keep
    their plain gradients (`head_update="full"`), as in the paper, which
    modifies only the shared parameters' gradients.

    Args:
        mode: `"representation"` (surgery on the gradients with respect to
            the shared representation Z, cheap) or `"parameters"` (on the
            gradients with respect to the shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients, the paper) or
            `"scaled"` (heads get their task weight times their gradient).
        seed: int or None, seed of the random task orders.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, the coefficients of the task
        gradients in sum_i g_i^PC.

    Example:

    ```python
    weighting = keras_mgda.weighting.PCGrad(seed=0)
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    def __init__(
        self,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        num_tasks = gram.num_tasks
        order = keras.random.shuffle(ops.arange(num_tasks, dtype="int32"), seed=self.seed_generator)
        return gram.finish(surgery(gram.unit, order, ops=ops))

    def get_config(self):
        config = super().get_config()
        config["seed"] = self.seed
        return config


def surgery(gram, order, *, ops=keras.ops):
    """PCGrad's coefficients for one task order.

    Args:
        gram: (T, T) Gram matrix.
        order: (T,) int32 permutation: the order in which every g_i^PC is
            projected against the other task gradients.
        ops: the namespace of array functions (default `keras.ops`).

    Returns:
        (T,) weights w with sum_i g_i^PC = sum_k w_k g_k.
    """
    gram = ops.convert_to_tensor(gram)
    order = ops.convert_to_tensor(order, dtype="int32")
    num_tasks = gram.shape[-1]
    dtype = gram.dtype
    diag = ops.diagonal(gram)
    tasks = ops.arange(num_tasks, dtype="int32")
    # Row i holds the coefficients of g_i^PC in the basis of task gradients.
    coefficients = ops.eye(num_tasks, dtype=dtype)

    def body(step, coefficients):
        j = ops.take(order, step)
        one_hot = ops.cast(tasks == j, dtype)
        column = ops.sum(gram * one_hot[None, :], axis=-1)  # M[:, j]
        dots = ops.sum(coefficients * column[None, :], axis=-1)  # g_i^PC . g_j
        norm2 = ops.sum(diag * one_hot)
        conflict = (dots < 0) & (tasks != j) & (norm2 > 0)
        step_size = ops.where(conflict, dots / ops.where(norm2 > 0, norm2, 1.0), 0.0)
        return coefficients - step_size[:, None] * one_hot[None, :]

    coefficients = ops.fori_loop(0, num_tasks, body, coefficients)
    return ops.sum(coefficients, axis=0)
