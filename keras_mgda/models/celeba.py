"""The CelebA ResNet-18 of Sener & Koltun's code (`multi_faces_resnet.py`)."""

from collections.abc import Iterable
from typing import Any

import keras

from keras_mgda.datasets.celeba import ATTRIBUTES
from keras_mgda.model import MultiTaskModel
from keras_mgda.models._build import multi_task_model
from keras_mgda.types import Shape
from keras_mgda.types import Tensor
from keras_mgda.types import WeightingLike

__all__ = [
    "celeba_resnet18",
    "resnet18_trunk",
]


def _basic_block(x, filters, stride, name):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, and a
    projection shortcut when the shape changes."""
    shortcut = x
    h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    h = keras.layers.BatchNormalization(name=f"{name}_bn1")(h)
    h = keras.layers.ReLU(name=f"{name}_relu1")(h)
    h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(h)
    h = keras.layers.BatchNormalization(name=f"{name}_bn2")(h)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(h)


def resnet18_trunk(images: Tensor, width: int = 64, pool_size: int = 4) -> Tensor:
    """ResNet-18 for small images (3x3 stem with stride 1, no max-pool, as
    the authors' and CIFAR's ResNets), then average pooling and flattening.

    Args:
        images: input tensor (B, H, W, C).
        width: filters of the first stage (64 in ResNet-18); the stages use
            width, 2x, 4x and 8x.
        pool_size: average-pooling window on the last feature map (the
            authors' 4: a 64x64 image gives 8x8x512 -> 2x2x512 -> 2048).

    Returns:
        The flattened features (B, F), from a layer named `"shared"`.
    """
    h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(images)
    h = keras.layers.BatchNormalization(name="stem_bn")(h)
    h = keras.layers.ReLU(name="stem_relu")(h)
    for stage, (multiple, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], start=1):
        h = _basic_block(h, width * multiple, stride, name=f"stage{stage}_block1")
        h = _basic_block(h, width * multiple, 1, name=f"stage{stage}_block2")
    h = keras.layers.AveragePooling2D(pool_size, name="avg_pool")(h)
    return keras.layers.Flatten(name="shared")(h)


def celeba_resnet18(
    weighting: WeightingLike = None,
    input_shape: Shape = (64, 64, 3),
    attributes: Iterable[str] = ATTRIBUTES,
    width: int = 64,
    name: str = "celeba_resnet18",
    **model_kwargs: Any,
) -> MultiTaskModel:
    """The authors' CelebA model, uncompiled: a ResNet-18 trunk shared by
    one linear head per attribute.

    The trunk is ResNet-18 for small images (3x3 stem, stride 1, no
    max-pool; stages of 64, 128, 256, 512 filters), 4x4 average pooling and
    flattening: 2048 features for a 64x64 image, the shared representation
    Z (layer `"shared"`). Each attribute has a dense layer with one logit
    (the authors used two logits and a softmax, the same model family),
    named after the attribute: train with
    `keras.losses.BinaryCrossentropy(from_logits=True)`.

    Args:
        weighting: None for MGDA-UB (an `MGDAModel`), or any
            `keras_mgda.weighting.Weighting` (a `MultiTaskModel`).
        input_shape: shape of one image; the height and width should be
            multiples of 32.
        attributes: names of the outputs, one per attribute; CelebA's 40
            by default.
        width: filters of the first stage (64 in ResNet-18; smaller for
            quick tests).
        name: model name.
        **model_kwargs: passed to the model (MGDA options, `on_nonfinite`).

    Returns:
        An uncompiled `keras_mgda.MGDAModel` (or `MultiTaskModel`) whose
        outputs are `{attribute: (B, 1) logits}`.

    Example:

    ```python
    model = keras_mgda.models.celeba_resnet18()
    model.compile(keras.optimizers.Adam(5e-4),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(keras_mgda.datasets.celeba("train").batch(256), epochs=100)
    ```
    """
    images = keras.Input(input_shape, name="image")
    z = resnet18_trunk(images, width=width)
    outputs = {attribute: keras.layers.Dense(1, name=attribute)(z) for attribute in attributes}
    return multi_task_model(images, outputs, weighting=weighting, name=name, **model_kwargs)
