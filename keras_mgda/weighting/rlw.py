"""Random loss weighting (Lin, Ye, Zhang & Tsang, TMLR 2022)."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "RLW",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class RLW(Weighting):
    """Random loss weighting: new random task weights at every step.

    Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning", TMLR 2022. At every step the
    weights are w = softmax(x) with x_t drawn from a standard normal
    distribution: positive, summing to 1, and on average uniform. This is
    the paper's default distribution and the one of its authors' library
    (LibMTL's `RLW`, `softmax(torch.randn(T))`); the paper reports that
    the other distributions it tried do about as well. Needs no gradients
    beyond the usual backward pass.

    The draws come from a `keras.random.SeedGenerator` that the model
    tracks: with a `seed`, two runs draw the same weights, and a model
    saved and loaded continues the sequence where it stopped.

    Args:
        seed: int or None, the seed of the draws.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights, positive, summing to 1.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.RLW(seed=0))
    ```
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, losses, gram=None):
        draws = keras.random.normal((losses.shape[0],), dtype="float32", seed=self.seed_generator)
        return ops.softmax(draws)

    def get_config(self):
        return {"seed": self.seed}
