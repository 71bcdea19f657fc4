"""The MultiMNIST LeNet of Sener & Koltun's code (`multi_lenet.py`)."""

import math
from collections.abc import Iterable
from typing import Any

import keras
from keras import ops

from keras_mgda.model import MultiTaskModel
from keras_mgda.models._build import multi_task_model
from keras_mgda.types import Shape
from keras_mgda.types import Tensor
from keras_mgda.types import WeightingLike

__all__ = [
    "multi_mnist_lenet",
    "UnscaledDropout",
]

DROPOUT_VARIANTS = ("keras", "authors")
INITIALIZERS = ("keras", "torch")


@keras.saving.register_keras_serializable(package="keras_mgda")
class UnscaledDropout(keras.layers.Layer):
    """Dropout without the 1/(1 - rate) rescaling, as Sener & Koltun's
    MultiMNIST LeNet applies it.

    In training, every mask entry keeps its unit with probability
    `1 - rate` and the kept units are NOT scaled up; at inference the layer
    is the identity (not scaled down either), so the network sees
    activations about 1/(1 - rate) times larger at test time than in
    training, as in the authors' code. Along `shared_axes` the mask has
    size 1: one draw is shared there. `shared_axes=(0, 1, 2)` on a
    channels-last feature map is the authors' conv2 mask, one channel mask
    for the whole batch; `shared_axes=()` drops every element on its own
    (their heads' dropout).

    Args:
        rate: float in [0, 1), the probability of dropping a unit.
        shared_axes: axes of the input (0 is the batch axis) along which
            one mask value is shared.
        seed: optional int, seeds the layer's `keras.random.SeedGenerator`.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Example:

    ```python
    # One mask over the channels of conv2, shared by the whole batch.
    h = UnscaledDropout(0.5, shared_axes=(0, 1, 2))(conv2_output)
    # A mask per element in a head.
    t = UnscaledDropout(0.5)(hidden)
    ```
    """

    def __init__(self, rate: float, shared_axes: Iterable[int] = (), seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"UnscaledDropout needs 0 <= rate < 1; received rate={rate}.")
        self.rate = float(rate)
        self.shared_axes = tuple(int(axis) for axis in shared_axes)
        self.seed = seed
        # A Keras seed generator: its state is a variable, so the draws are
        # carried through JAX's stateless jitted step like Dropout's.
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def _mask_shape(self, inputs):
        shape = list(ops.shape(inputs))
        for axis in self.shared_axes:
            shape[axis] = 1
        return tuple(shape)

    def call(self, inputs: Tensor, training: bool = False) -> Tensor:
        if not training or self.rate == 0.0:
            return inputs
        draws = keras.random.uniform(self._mask_shape(inputs), seed=self.seed_generator)
        keep = ops.cast(ops.greater_equal(draws, self.rate), inputs.dtype)
        return inputs * keep

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"rate": self.rate, "shared_axes": list(self.shared_axes), "seed": self.seed})
        return config


def _channel_dropout(rate, variant):
    """The dropout after conv2: Keras's per-sample, rescaled
    SpatialDropout2D, or the authors' batch-shared, unscaled channel mask."""
    if variant == "keras":
        return keras.layers.SpatialDropout2D(rate, name="conv2_dropout")
    # Share the mask over the batch and the spatial axes: the authors' mask
    # has shape (1, C, 1, 1) in PyTorch's channels-first layout.
    if keras.config.image_data_format() == "channels_last":
        shared = (0, 1, 2)
    else:
        shared = (0, 2, 3)
    return UnscaledDropout(rate, shared_axes=shared, name="conv2_dropout")


def _head_dropout(rate, variant, task):
    if variant == "keras":
        return keras.layers.Dropout(rate, name=f"{task}_dropout")
    return UnscaledDropout(rate, name=f"{task}_dropout")


def _init(initializer, inputs, kernel_size=1):
    """Keras's defaults (Glorot-uniform kernels, zero biases), or PyTorch's
    (kernels and biases uniform in +-1/sqrt(fan_in)), the authors' init,
    for a layer that reads `inputs`."""
    if initializer == "keras":
        return {}
    bound = 1.0 / math.sqrt(_fan_in(inputs, kernel_size))
    return {
        # Uniform in +-sqrt(3 * scale / fan_in): scale 1/3 gives PyTorch's bound.
        "kernel_initializer": keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
    }


def _fan_in(tensor, kernel_size):
    channels = tensor.shape[-1 if keras.config.image_data_format() == "channels_last" else 1]
    return int(channels) * kernel_size * kernel_size


def _trunk(images, dropout, dropout_variant, initializer):
    """Conv 10@5x5, pool, ReLU, conv 20@5x5, dropout, pool, ReLU, dense 50
    + ReLU: the shared representation Z."""
    h = keras.layers.Conv2D(10, 5, name="conv1", **_init(initializer, images, 5))(images)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(20, 5, name="conv2", **_init(initializer, h, 5))(h)
    if dropout:
        h = _channel_dropout(dropout, dropout_variant)(h)
    h = keras.layers.MaxPooling2D(2, name="pool2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    return keras.layers.Dense(50, activation="relu", name="shared", **_init(initializer, h))(h)


def _head(z, task, dropout, dropout_variant, initializer):
    """Dense 50 + ReLU, dropout, dense 10 logits."""
    t = keras.layers.Dense(50, activation="relu", name=f"{task}_fc1", **_init(initializer, z))(z)
    if dropout:
        t = _head_dropout(dropout, dropout_variant, task)(t)
    return keras.layers.Dense(10, name=task, **_init(initializer, t))(t)


def multi_mnist_lenet(
    weighting: WeightingLike = None,
    dropout: float = 0.5,
    input_shape: Shape = (28, 28, 1),
    name: str = "multi_mnist_lenet",
    dropout_variant: str = "keras",
    initializer: str = "keras",
    **model_kwargs: Any,
) -> MultiTaskModel:
    """The authors' two-task LeNet for MultiMNIST, uncompiled.

    Trunk: conv 10@5x5, max-pool 2, ReLU, conv 20@5x5, channel dropout,
    max-pool 2, ReLU, dense 50 + ReLU: the shared representation Z (layer
    `"shared"`). Each head: dense 50 + ReLU, dropout, dense 10 logits.
    Outputs `"left"` and `"right"`. The dropouts (rate 0.5 by default) are
    the authors' (`Dropout2d` after the second convolution, dropout in the
    heads); `dropout=0` removes them.

    Two dropout variants:
    - `"keras"` (default): Keras's `SpatialDropout2D` (one channel mask per
      image) and `Dropout` (one mask per element), both rescaled by
      1/(1 - rate) in training: the standard, train/test-consistent form.
    - `"authors"`: exactly what the authors' `multi_lenet.py` does: after
      conv2 one channel mask for the whole batch (shape (1, 1, 1, C)), in
      the heads one mask per element, neither rescaled in training and
      both skipped at test time (`UnscaledDropout`), so test activations
      are about 1/(1 - rate) times the training ones.

    Two initialisations: `"keras"` (default; Glorot-uniform kernels, zero
    biases) and `"torch"`, PyTorch's default for `Conv2d` and `Linear`,
    which the authors' code used: kernels and biases uniform in
    +-1/sqrt(fan_in).

    Args:
        weighting: None for MGDA-UB (an `MGDAModel`), or any
            `keras_mgda.weighting.Weighting` (a `MultiTaskModel`).
        dropout: dropout rate of the trunk's channel dropout and the heads'.
        input_shape: shape of one image.
        name: model name.
        dropout_variant: `"keras"` or `"authors"` (see above).
        initializer: `"keras"` or `"torch"` (see above).
        **model_kwargs: passed to the model: MGDA options (`normalization`,
            `mode`, ...) when `weighting` is None, `on_nonfinite`, ...

    Returns:
        An uncompiled `keras_mgda.MGDAModel` (or `MultiTaskModel`) with
        outputs `{"left": (B, 10), "right": (B, 10)}` logits.

    Example:

    ```python
    model = keras_mgda.models.multi_mnist_lenet(
        weighting=keras_mgda.weighting.MGDA(normalization="none"),
        dropout_variant="authors")
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics={"left": ["accuracy"], "right": ["accuracy"]})
    model.fit(keras_mgda.datasets.multi_mnist("train").batch(256), epochs=100)
    ```
    """
    if dropout_variant not in DROPOUT_VARIANTS:
        raise ValueError(
            f"Unknown dropout_variant {dropout_variant!r}; use one of {DROPOUT_VARIANTS}."
        )
    if initializer not in INITIALIZERS:
        raise ValueError(f"Unknown initializer {initializer!r}; use one of {INITIALIZERS}.")
    images = keras.Input(input_shape, name="image")
    z = _trunk(images, dropout, dropout_variant, initializer)
    outputs = {task: _head(z, task, dropout, dropout_variant, initializer) for task in ("left", "right")}
    return multi_task_model(images, outputs, weighting=weighting, name=name, **model_kwargs)
