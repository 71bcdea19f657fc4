"""Metrics of the paper's benchmarks, and the relative multi-task
performance delta_m.

- `SegmentationMeanIoU`: mean intersection over union over the classes that
  occur (Cityscapes semantic segmentation).
- `InstanceOffsetError`: mean absolute error, in pixels, of the offsets to
  the instance centres, on instance pixels (Kendall et al.'s proxy task).
- `DisparityError`: mean absolute disparity error on pixels with a
  measurement.
- `BinaryErrorRate`: the error of one binary attribute (CelebA).
- `delta_m`: Maninis et al. (2019)'s relative performance against
  single-task baselines.

All are `keras.metrics.Metric` written with `keras.ops`, so they run on
TensorFlow, JAX and PyTorch, save with the model and accumulate over
batches (`evaluate` reports the value over the whole data set).
"""

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import SupportsFloat

import keras
from keras import ops

from keras_mgda.types import ArrayLike
from keras_mgda.types import Tensor

__all__ = [
    "BinaryErrorRate",
    "delta_m",
    "DisparityError",
    "InstanceOffsetError",
    "SegmentationMeanIoU",
]


def _weights_like(sample_weight, mask):
    """`mask` times `sample_weight` broadcast from the batch axis."""
    if sample_weight is None:
        return mask
    sample_weight = ops.cast(sample_weight, mask.dtype)
    while len(sample_weight.shape) < len(mask.shape):
        sample_weight = ops.expand_dims(sample_weight, -1)
    return mask * sample_weight


@keras.saving.register_keras_serializable(package="keras_mgda")
class SegmentationMeanIoU(keras.metrics.Metric):
    """Mean intersection over union over the classes that occur.

    Accumulates a confusion matrix over every batch; the result is the mean,
    over the classes that appear in the labels or the predictions (their
    union is not empty), of true positives / (true positives + false
    positives + false negatives). Pixels labelled `ignore_class` (or outside
    0..num_classes-1) do not count. The authors' code computes the same
    quantity (`nanmean` of the per-class IoU).

    Args:
        num_classes: number of classes (19 for Cityscapes).
        ignore_class: label of pixels to ignore (255 for Cityscapes), or None.
        name: the metric's name, as for `keras.metrics.Metric`.
        dtype: its dtype, as for `keras.metrics.Metric`.

    Example:

    ```python
    metric = keras_mgda.metrics.SegmentationMeanIoU(num_classes=19)
    metric.update_state(labels, logits)  # (B, H, W), (B, H, W, 19)
    metric.result()
    ```
    """

    def __init__(
        self, num_classes: int, ignore_class: int | None = 255, name: str = "mean_iou", dtype: str | None = None
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        self.ignore_class = None if ignore_class is None else int(ignore_class)
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="float32",
            name="confusion",
        )

    def update_state(self, y_true: ArrayLike, y_pred: ArrayLike, sample_weight: ArrayLike | None = None) -> None:
        """Adds a batch: `y_true` int (B, H, W) or (B, H, W, 1); `y_pred`
        scores (B, H, W, C) (logits or probabilities) or int class ids of
        `y_true`'s shape."""
        y_true = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        if (
            len(y_true.shape) == len(y_pred.shape)
            and y_true.shape[-1] == 1
            and y_pred.shape[-1] != 1
        ):
            y_true = ops.squeeze(y_true, -1)
        if len(y_pred.shape) == len(y_true.shape) + 1:
            y_pred = ops.argmax(y_pred, axis=-1)
        batch = ops.shape(y_true)[0]
        y_true = ops.reshape(ops.cast(y_true, "int32"), (batch, -1))
        y_pred = ops.reshape(ops.cast(y_pred, "int32"), (batch, -1))
        valid = ops.logical_and(y_true >= 0, y_true < self.num_classes)
        if self.ignore_class is not None:
            valid = ops.logical_and(valid, y_true != self.ignore_class)
        weights = _weights_like(sample_weight, ops.cast(valid, "float32"))
        y_true = ops.reshape(y_true, (-1,))
        y_pred = ops.reshape(y_pred, (-1,))
        valid = ops.reshape(valid, (-1,))
        weights = ops.reshape(weights, (-1,))
        y_pred = ops.clip(y_pred, 0, self.num_classes - 1)
        index = ops.where(valid, y_true * self.num_classes + y_pred, 0)
        counts = ops.segment_sum(weights, index, num_segments=self.num_classes**2)
        self.confusion.assign_add(ops.reshape(counts, (self.num_classes, self.num_classes)))

    def per_class_iou(self) -> Tensor:
        """IoU of each class, NaN for classes that never occurred.

        Returns:
            float32 tensor (num_classes,).
        """
        confusion = ops.convert_to_tensor(self.confusion)
        true_positive = ops.diagonal(confusion)
        union = ops.sum(confusion, axis=0) + ops.sum(confusion, axis=1) - true_positive
        nan = ops.full_like(union, float("nan"))
        return ops.where(union > 0, true_positive / ops.maximum(union, 1e-12), nan)

    def result(self) -> Tensor:
        confusion = ops.convert_to_tensor(self.confusion)
        true_positive = ops.diagonal(confusion)
        union = ops.sum(confusion, axis=0) + ops.sum(confusion, axis=1) - true_positive
        occurs = ops.cast(union > 0, "float32")
        iou = true_positive / ops.maximum(union, 1e-12)
        return ops.sum(iou * occurs) / ops.maximum(ops.sum(occurs), 1.0)

    def reset_state(self) -> None:
        self.confusion.assign(ops.zeros((self.num_classes, self.num_classes), dtype="float32"))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "ignore_class": self.ignore_class})
        return config


class _MaskedMeanAbsoluteError(keras.metrics.Metric):
    """Sum of |y_pred - target| over valid elements, divided by their count."""

    def __init__(self, name: str, dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def _target_and_mask(self, y_true, y_pred):
        raise NotImplementedError

    def update_state(self, y_true: ArrayLike, y_pred: ArrayLike, sample_weight: ArrayLike | None = None) -> None:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        target, mask = self._target_and_mask(y_true, y_pred)
        mask = ops.broadcast_to(mask, ops.shape(target))
        mask = _weights_like(sample_weight, mask)
        error = ops.abs(y_pred - target) * mask
        self.total.assign_add(ops.sum(error))
        self.count.assign_add(ops.sum(mask))

    def result(self) -> Tensor:
        return self.total / ops.maximum(self.count, 1e-12)

    def reset_state(self) -> None:
        self.total.assign(0.0)
        self.count.assign(0.0)


@keras.saving.register_keras_serializable(package="keras_mgda")
class InstanceOffsetError(_MaskedMeanAbsoluteError):
    """Mean absolute error of the predicted offsets to the instance centres,
    in pixels, over instance pixels (the authors' "instance error").

    `y_true` holds `(dy, dx, mask)` in its last axis, as
    `keras_mgda.datasets.cityscapes` makes it; `y_pred` holds `(dy, dx)`.
    The error is averaged over both coordinates of every pixel with
    `mask = 1`, as the authors' L1 metric did.

    Args:
        name: the metric's name, as for `keras.metrics.Metric`.
        dtype: its dtype, as for `keras.metrics.Metric`.

    Example:

    ```python
    metric = keras_mgda.metrics.InstanceOffsetError()
    metric.update_state(targets["instance"], predictions["instance"])
    ```
    """

    def __init__(self, name: str = "instance_error", dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def _target_and_mask(self, y_true, y_pred):
        return y_true[..., :2], y_true[..., 2:3]

    def get_config(self) -> dict[str, Any]:
        return super().get_config()


@keras.saving.register_keras_serializable(package="keras_mgda")
class DisparityError(_MaskedMeanAbsoluteError):
    """Mean absolute disparity error over pixels with a measurement.

    Pixels whose true disparity is 0 (no measurement in Cityscapes) do not
    count. Same units as the targets (pixels for
    `keras_mgda.datasets.cityscapes`).

    Args:
        name: the metric's name, as for `keras.metrics.Metric`.
        dtype: its dtype, as for `keras.metrics.Metric`.

    Example:

    ```python
    metric = keras_mgda.metrics.DisparityError()
    metric.update_state(targets["disparity"], predictions["disparity"])
    ```
    """

    def __init__(self, name: str = "disparity_error", dtype: str | None = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def _target_and_mask(self, y_true, y_pred):
        return y_true, ops.cast(y_true > 0, "float32")

    def get_config(self) -> dict[str, Any]:
        return super().get_config()


@keras.saving.register_keras_serializable(package="keras_mgda")
class BinaryErrorRate(keras.metrics.Metric):
    """The share of wrong predictions of a binary target (CelebA's
    per-attribute error).

    Args:
        from_logits: whether `y_pred` holds logits (True, the default for
            `keras_mgda.models.celeba_resnet18`) or probabilities.
        threshold: decision threshold on the probability.
        name: the metric's name, as for `keras.metrics.Metric`.
        dtype: its dtype, as for `keras.metrics.Metric`.

    Example:

    ```python
    model.compile(..., metrics={name: [keras_mgda.metrics.BinaryErrorRate()]
                                for name in keras_mgda.datasets.CELEBA_ATTRIBUTES})
    ```
    """

    def __init__(
        self, from_logits: bool = True, threshold: float = 0.5, name: str = "error", dtype: str | None = None
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.threshold = float(threshold)
        self.wrong = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="wrong")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true: ArrayLike, y_pred: ArrayLike, sample_weight: ArrayLike | None = None) -> None:
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if len(y_pred.shape) == len(y_true.shape) + 1 and y_pred.shape[-1] == 1:
            y_pred = ops.squeeze(y_pred, -1)
        elif len(y_true.shape) == len(y_pred.shape) + 1 and y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, -1)
        if self.from_logits:
            cut = math.log(self.threshold / (1.0 - self.threshold))
        else:
            cut = self.threshold
        predicted = ops.cast(y_pred > cut, "float32")
        wrong = ops.cast(predicted != ops.cast(y_true > 0.5, "float32"), "float32")
        weights = _weights_like(sample_weight, ops.ones_like(wrong))
        self.wrong.assign_add(ops.sum(wrong * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self) -> Tensor:
        return self.wrong / ops.maximum(self.count, 1e-12)

    def reset_state(self) -> None:
        self.wrong.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"from_logits": self.from_logits, "threshold": self.threshold})
        return config


def delta_m(
    scores: dict[str, SupportsFloat] | Sequence[SupportsFloat],
    baselines: Mapping[str, SupportsFloat] | Sequence[SupportsFloat],
    lower_is_better: bool | dict[str, bool] | Sequence[bool] = False,
) -> float:
    """Relative multi-task performance against single-task baselines
    (Maninis, Radosavovic and Kokkinos, CVPR 2019):

        delta_m = (1/T) sum_t (-1)^{l_t} (M_t - B_t) / B_t

    with M_t the multi-task model's metric on task t, B_t the single-task
    baseline's, and l_t = 1 when lower is better for that metric (errors,
    losses) and 0 when higher is better (accuracy, IoU). Positive values mean
    the multi-task model beats its single-task baselines on average. It is a
    fraction: multiply by 100 for the percentage papers report.

    Args:
        scores: the multi-task metrics, a dict `{name: value}` or a sequence.
        baselines: the single-task metrics, same keys or length as `scores`.
        lower_is_better: a bool for all metrics, or a dict / sequence of bools
            matching `scores`.

    Returns:
        float.

    Example:

    ```python
    keras_mgda.metrics.delta_m(
        {"miou": 0.66, "instance": 10.3, "disparity": 2.5},
        {"miou": 0.60, "instance": 11.0, "disparity": 2.6},
        lower_is_better={"miou": False, "instance": True, "disparity": True},
    )  # ~0.067: 6.7% better than the single-task models on average
    ```
    """
    if isinstance(scores, dict):
        names = list(scores)
        if set(names) != set(baselines):
            raise ValueError(
                "scores and baselines must name the same metrics; received "
                f"{sorted(scores)} and {sorted(baselines)}."
            )
        values = [scores[n] for n in names]
        references = [baselines[n] for n in names]
        if isinstance(lower_is_better, dict):
            missing = set(names) - set(lower_is_better)
            if missing:
                raise ValueError(f"lower_is_better does not say for {sorted(missing)}.")
            flags = [lower_is_better[n] for n in names]
        elif isinstance(lower_is_better, bool):
            flags = [lower_is_better] * len(names)
        else:
            raise TypeError("With dict scores, lower_is_better must be a bool or a dict.")
    else:
        values, references = list(scores), list(baselines)
        if len(values) != len(references):
            raise ValueError(
                f"scores and baselines differ in length: {len(values)} and {len(references)}."
            )
        if isinstance(lower_is_better, bool):
            flags = [lower_is_better] * len(values)
        else:
            flags = list(lower_is_better)
            if len(flags) != len(values):
                raise ValueError("lower_is_better must have one flag per score.")
    if not values:
        raise ValueError("delta_m needs at least one metric.")
    total = 0.0
    for value, reference, lower in zip(values, references, flags):
        value, reference = float(value), float(reference)
        if reference == 0.0:
            raise ValueError("delta_m is undefined for a baseline metric of 0.")
        sign = -1.0 if lower else 1.0
        total += sign * (value - reference) / reference
    return total / len(values)
