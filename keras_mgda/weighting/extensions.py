"""The two extension points for methods that are not a per-task weighting
of the Gram matrix, used only by the methods that need them, so the Gram
path keeps its speed.

- `GradientAggregator`: the method receives the per-task gradients
  themselves (with respect to Z, or to the shared weights in
  `mode="parameters"`) and returns the update direction in that space
  (GradDrop masks dL_t/dZ elementwise; MoCo tracks per-task gradient
  estimates).
- `AfterUpdateHook`: the method sees the task losses of the same batch
  after the update (FAMO learns its weights from how much each loss
  fell). The step pays one more forward pass, in training mode, for it.
"""

import keras

from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting.base import Weighting

__all__ = ["AfterUpdateHook", "GradientAggregator"]


class GradientAggregator(GradientWeighting):
    """Base of the methods that act on the per-task gradients.

    The step computes the per-task gradients (representation mode: G_t =
    dL_t/dZ, one (T, batch, ...) tensor; parameters mode: one (T, ...)
    tensor per shared weight) and their Gram matrix, and calls
    `aggregate(gradients, losses, gram)`. The direction it returns
    replaces sum_t w_t G_t: in representation mode it is the cotangent of
    the encoder's one backward, in parameters mode the shared weights'
    gradients themselves. The task weights it returns are logged and set
    the heads' updates (`head_weights`).

    Subclasses implement `aggregate`; `call` is not used.

    Example:

    ```python
    class Mean(GradientAggregator):
        def aggregate(self, gradients, losses, gram, ops=keras.ops):
            weights = ops.full_like(losses, 1.0 / losses.shape[0])
            return [ops.mean(g, axis=0) for g in gradients], weights
    ```
    """

    base_class = True  # not a method: left out of `by_name`

    aggregates_gradients = True

    def aggregate(self, gradients, losses, gram, ops=keras.ops):
        """The update direction from the per-task gradients.

        Args:
            gradients: list of (T, ...) tensors, the per-task gradients in
                the method's gradient space (scaled like the losses under
                mixed precision).
            losses: float32 (T,) task losses, constants.
            gram: float32 (T, T) Gram matrix of `gradients`.
            ops: the array namespace.

        Returns:
            `(directions, weights)`: a list of tensors shaped like each
            `gradients[i][0]`, and (T,) task weights to log.
        """
        raise NotImplementedError

    def call(self, losses, gram=None, ops=keras.ops):
        raise TypeError(
            f"{type(self).__name__} aggregates the per-task gradients: the "
            "train step calls its `aggregate`, not the weighting itself."
        )


class AfterUpdateHook(Weighting):
    """A mixin for methods that learn from the losses after the update.

    After a step is applied, the step evaluates the task losses of the
    same batch again, with the updated weights, and calls
    `after_update(losses, new_losses)`, which may assign the method's
    state. Not called for a skipped step. That forward runs in training
    mode, as the step's own did, so the two losses differ by the update
    and not by dropout or BatchNorm switching modes (a fresh dropout
    mask, BatchNorm on the batch's statistics); it changes no BatchNorm
    statistic, dropout seed or metric.
    """

    base_class = True  # not a method: left out of `by_name`

    needs_losses_after_update = True

    def after_update(self, losses, new_losses):
        """Updates the method's state.

        Args:
            losses: float32 (T,) task losses before the update.
            new_losses: float32 (T,) task losses of the same batch after it.
        """
        raise NotImplementedError
