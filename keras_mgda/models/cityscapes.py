"""The Cityscapes model of the paper: a ResNet-50 trunk and three
pyramid-pooling (PSPNet) decoders, for semantic segmentation, instance
offsets and disparity; with the losses and metrics to train it."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from keras_mgda import metrics as metrics_lib
from keras_mgda.model import MultiTaskModel
from keras_mgda.models._build import multi_task_model
from keras_mgda.types import Shape
from keras_mgda.types import Tensor
from keras_mgda.types import WeightingLike

__all__ = [
    "AdaptiveAveragePooling",
    "cityscapes_losses",
    "cityscapes_metrics",
    "cityscapes_pspnet",
    "DisparityLoss",
    "ImageNetCaffePreprocessing",
    "InstanceOffsetLoss",
    "pyramid_pooling_decoder",
]

IMAGENET_CAFFE_MEAN = (103.939, 116.779, 123.68)  # BGR


@keras.saving.register_keras_serializable(package="keras_mgda")
class ImageNetCaffePreprocessing(keras.layers.Layer):
    """RGB images in [0, 1] -> the input `keras.applications.ResNet50`
    expects (BGR, 0-255, ImageNet mean subtracted), so that
    `weights="imagenet"` sees what it was trained on.

    Example:

    ```python
    x = ImageNetCaffePreprocessing()(images)  # images in [0, 1]
    ```
    """

    def __init__(self, **kwargs: Any) -> None:
        """Args: **kwargs: passed to `keras.layers.Layer` (e.g. `name`)."""
        super().__init__(**kwargs)

    def call(self, images: Tensor) -> Tensor:
        images = ops.flip(ops.cast(images, self.compute_dtype) * 255.0, axis=-1)
        mean = ops.convert_to_tensor(IMAGENET_CAFFE_MEAN, dtype=self.compute_dtype)
        return images - mean

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return input_shape


@keras.saving.register_keras_serializable(package="keras_mgda")
class AdaptiveAveragePooling(keras.layers.Layer):
    """Average pooling to a fixed `bins x bins` grid (PyTorch's
    `AdaptiveAvgPool2d`: bin i covers rows floor(i H / bins) to
    ceil((i + 1) H / bins)), for inputs of static height and width.

    Args:
        bins: size of the output grid.

    Example:

    ```python
    pooled = AdaptiveAveragePooling(6)(features)  # (B, 6, 6, C)
    ```
    """

    def __init__(self, bins: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bins = int(bins)

    @staticmethod
    def _edges(size, bins):
        return [((i * size) // bins, -(-((i + 1) * size) // bins)) for i in range(bins)]

    def call(self, x: Tensor) -> Tensor:
        height, width = x.shape[1], x.shape[2]
        if height is None or width is None:
            raise ValueError("AdaptiveAveragePooling needs a static height and width.")
        rows = []
        for top, bottom in self._edges(height, self.bins):
            cells = [
                ops.mean(x[:, top:bottom, left:right, :], axis=(1, 2))
                for left, right in self._edges(width, self.bins)
            ]
            rows.append(ops.stack(cells, axis=1))
        return ops.stack(rows, axis=1)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0], self.bins, self.bins, input_shape[3])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["bins"] = self.bins
        return config


def pyramid_pooling_decoder(
    z: Tensor,
    num_outputs: int,
    output_size: Sequence[int],
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    channels: int = 512,
    name: str = "decoder",
) -> Tensor:
    """PSPNet's pyramid-pooling decoder (the authors' `SegmentationDecoder`).

    Each scale s: average pooling to s x s, 1x1 convolution to `channels`,
    BatchNorm, ReLU, bilinear upsampling to Z's size. Then Z and the scales
    are concatenated, 3x3 convolution to `channels`, BatchNorm, ReLU, a 1x1
    convolution to `num_outputs`, and bilinear upsampling to `output_size`.

    Args:
        z: the trunk's feature map (B, h, w, C), static h and w.
        num_outputs: output channels.
        output_size: (height, width) of the output.
        pool_scales: grid sizes of the pyramid.
        channels: width of the decoder's convolutions (512 in PSPNet).
        name: prefix of the layer names; the last layer is named `name`.

    Returns:
        Tensor (B, height, width, num_outputs).
    """
    height, width = z.shape[1], z.shape[2]
    branches = [z]
    for scale in pool_scales:
        p = AdaptiveAveragePooling(scale, name=f"{name}_pool{scale}")(z)
        p = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_pool{scale}_conv")(p)
        p = keras.layers.BatchNormalization(name=f"{name}_pool{scale}_bn")(p)
        p = keras.layers.ReLU(name=f"{name}_pool{scale}_relu")(p)
        p = keras.layers.Resizing(height, width, interpolation="bilinear", name=f"{name}_pool{scale}_up")(p)
        branches.append(p)
    h = keras.layers.Concatenate(name=f"{name}_concat")(branches)
    h = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_conv")(h)
    h = keras.layers.BatchNormalization(name=f"{name}_bn")(h)
    h = keras.layers.ReLU(name=f"{name}_relu")(h)
    h = keras.layers.Conv2D(num_outputs, 1, name=f"{name}_logits")(h)
    return keras.layers.Resizing(
        int(output_size[0]), int(output_size[1]), interpolation="bilinear", name=name
    )(h)


def cityscapes_pspnet(
    weighting: WeightingLike = None,
    input_shape: Shape = (256, 512, 3),
    num_classes: int = 19,
    weights: str | None = None,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    decoder_channels: int = 512,
    backbone: str | Callable[[Tensor], Tensor] = "resnet50",
    name: str = "cityscapes_pspnet",
    **model_kwargs: Any,
) -> MultiTaskModel:
    """The paper's Cityscapes model, uncompiled: a ResNet-50 trunk shared by
    three pyramid-pooling decoders.

    The trunk is `keras.applications.ResNet50` without its top (preceded by
    `ImageNetCaffePreprocessing`, so inputs are RGB in [0, 1] as
    `keras_mgda.datasets.cityscapes` yields them); its last feature map
    (stride 32) is the shared representation Z. The authors used a dilated
    ResNet-50 (stride 8), which `keras.applications` does not offer; the
    decoders here upsample to the input resolution instead.

    Outputs, all at the input resolution:
    - `"segmentation"`: (B, H, W, num_classes) logits;
    - `"instance"`: (B, H, W, 2) offsets (dy, dx) to the instance centre;
    - `"disparity"`: (B, H, W, 1).

    Compile with `cityscapes_losses()` and `cityscapes_metrics()`.

    Args:
        weighting: None for MGDA-UB (an `MGDAModel`), or any
            `keras_mgda.weighting.Weighting` (a `MultiTaskModel`).
        input_shape: shape of one image (256x512x3 in the paper); height and
            width at least 32.
        num_classes: semantic classes (19 for Cityscapes).
        weights: None (random initialisation) or `"imagenet"` (downloads
            Keras's ImageNet weights for the trunk; the authors started from
            ImageNet weights).
        pool_scales: grid sizes of the pyramid pooling.
        decoder_channels: width of each decoder (512 in PSPNet).
        backbone: `"resnet50"` (the paper's trunk), or a callable (a
            `keras.Model`, a function of Keras layers) mapping the
            preprocessed images (B, H, W, 3) to a feature map (B, h, w, C)
            with static h and w: another trunk, or a tiny one for tests.
            `weights` applies to `"resnet50"` only.
        name: model name.
        **model_kwargs: passed to the model (MGDA options, `on_nonfinite`).

    Returns:
        An uncompiled `keras_mgda.MGDAModel` (or `MultiTaskModel`).

    Example:

    ```python
    model = keras_mgda.models.cityscapes_pspnet(weights="imagenet")
    model.compile(keras.optimizers.Adam(5e-4),
                  loss=keras_mgda.models.cityscapes_losses(),
                  metrics=keras_mgda.models.cityscapes_metrics())
    ```
    """
    images = keras.Input(input_shape, name="image")
    x = ImageNetCaffePreprocessing(name="imagenet_preprocessing")(images)
    if isinstance(backbone, str):
        if backbone != "resnet50":
            raise ValueError(f"backbone must be 'resnet50' or a callable; received {backbone!r}.")
        z = keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=x).output
    else:
        z = backbone(x)
    size = (input_shape[0], input_shape[1])
    outputs = {
        task: pyramid_pooling_decoder(
            z, channels_out, size, pool_scales=pool_scales, channels=decoder_channels, name=task
        )
        for task, channels_out in (("segmentation", num_classes), ("instance", 2), ("disparity", 1))
    }
    return multi_task_model(images, outputs, weighting=weighting, name=name, **model_kwargs)


def _masked_mean(errors, mask):
    """Per-element values whose Keras mean ("sum_over_batch_size") is the
    mean of `errors` over the elements where `mask` is 1 (0 if none)."""
    mask = ops.broadcast_to(mask, ops.shape(errors))
    total = ops.sum(ops.ones_like(mask))
    return errors * mask * (total / ops.maximum(ops.sum(mask), 1.0))


@keras.saving.register_keras_serializable(package="keras_mgda")
class InstanceOffsetLoss(keras.losses.Loss):
    """L1 loss of the instance offsets over instance pixels (the authors'
    `l1_loss_instance`): the mean over the batch's instance pixels of
    |dy_pred - dy| + |dx_pred - dx|, halved (a mean over both coordinates).

    `y_true` is (B, H, W, 3) = (dy, dx, mask), `y_pred` (B, H, W, 2).

    Example:

    ```python
    model.compile(..., loss={"instance": InstanceOffsetLoss(), ...})
    ```
    """

    def __init__(self, name: str = "instance_offset_l1", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        return _masked_mean(ops.abs(y_pred - y_true[..., :2]), y_true[..., 2:3])

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction}


@keras.saving.register_keras_serializable(package="keras_mgda")
class DisparityLoss(keras.losses.Loss):
    """L1 loss of the disparity over pixels with a measurement (true
    disparity > 0; the authors' `l1_loss_depth`).

    Example:

    ```python
    model.compile(..., loss={"disparity": DisparityLoss(), ...})
    ```
    """

    def __init__(self, name: str = "disparity_l1", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        return _masked_mean(ops.abs(y_pred - y_true), ops.cast(y_true > 0, "float32"))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction}


def cityscapes_losses(ignore_class: int | None = 255) -> dict[str, keras.losses.Loss]:
    """The losses of the three Cityscapes tasks, as `compile` takes them.

    Args:
        ignore_class: segmentation label to ignore.

    Returns:
        dict: `"segmentation"`: sparse categorical crossentropy on logits
        ignoring `ignore_class`; `"instance"`: `InstanceOffsetLoss`;
        `"disparity"`: `DisparityLoss`.
    """
    return {
        "segmentation": keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=ignore_class
        ),
        "instance": InstanceOffsetLoss(),
        "disparity": DisparityLoss(),
    }


def cityscapes_metrics(num_classes: int = 19, ignore_class: int | None = 255) -> dict[str, list[keras.metrics.Metric]]:
    """The paper's Cityscapes metrics, as `compile` takes them.

    Returns:
        dict: mean IoU for `"segmentation"`, `InstanceOffsetError` for
        `"instance"`, `DisparityError` for `"disparity"`.
    """
    return {
        "segmentation": [metrics_lib.SegmentationMeanIoU(num_classes, ignore_class=ignore_class)],
        "instance": [metrics_lib.InstanceOffsetError()],
        "disparity": [metrics_lib.DisparityError()],
    }
