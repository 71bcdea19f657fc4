"""The weighting interface: per-task losses (and, when asked for, the Gram
matrix of the per-task gradients) in, one weight per task out.

Almost every loss-balancing method is a function of the T x T Gram matrix
M = G G^T and the losses. The model computes M only for weightings that set
`requires_gram`, then backpropagates sum_t w_t dL_t/dZ through the encoder
once, so every method inherits the one-backward train step.
"""

import keras

GRADIENT_SPACES = ("representation", "parameters")


class Weighting:
    """Base class of the task weightings.

    Subclasses implement `call(losses, gram)` and set `requires_gram` when
    they need the Gram matrix of the per-task gradients.

    Attributes:
        requires_gram: whether `call` reads the Gram matrix.
        gradient_space: `"representation"` (gradients with respect to the
            shared representation Z, MGDA-UB) or `"parameters"` (with respect
            to the shared weights).

    Example:

    ```python
    class Halves(Weighting):
        def call(self, losses, gram=None):
            return keras.ops.full_like(losses, 0.5)
    ```
    """

    requires_gram = False
    gradient_space = "representation"

    def __call__(self, losses, gram=None):
        """Returns the task weights.

        Args:
            losses: float32 tensor (T,), the per-task (weighted) losses.
            gram: float32 tensor (T, T), the Gram matrix of the per-task
                gradients, or None when `requires_gram` is False.

        Returns:
            float32 tensor (T,): the weight of each task's loss in the
            shared (encoder) update.
        """
        return self.call(losses, gram)

    def call(self, losses, gram=None):
        raise NotImplementedError

    def head_weights(self, weights):
        """The coefficient of each task's loss in its head's update.

        Args:
            weights: the output of `__call__`.

        Returns:
            (T,) coefficients; by default the same weights.
        """
        return weights

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"


def get(identifier):
    """Returns a `Weighting` from an instance, a config dict or None (MGDA).

    Args:
        identifier: a `Weighting`, a dict from `keras.saving.serialize_keras_object`,
            or None.

    Returns:
        A `Weighting` instance.
    """
    if identifier is None:
        from keras_mgda.weighting.mgda import MGDA

        return MGDA()
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if not isinstance(identifier, Weighting):
        raise TypeError(
            "`weighting` must be a keras_mgda.weighting.Weighting instance "
            f"such as keras_mgda.weighting.MGDA(); received {identifier!r}."
        )
    return identifier
