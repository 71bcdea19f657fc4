"""The benchmark metrics against values computed by hand, and delta_m."""

import keras
import numpy as np
import pytest

import keras_mgda as km
from keras_mgda import metrics as M

# The metrics are Keras metrics on keras.ops state, checked by hand on every
# backend; delta_m is host arithmetic, checked once (one_backend).


def _value(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_mean_iou_by_hand():
    # 2x3 image, classes 0..2 (3 classes declared, class 2 never occurs), one ignored pixel.
    y_true = np.array([[[0, 0, 1], [1, 1, 255]]])
    y_pred_ids = np.array([[[0, 1, 1], [1, 0, 2]]])  # the ignored pixel's prediction does not count
    logits = np.eye(3, dtype="float32")[y_pred_ids] * 5.0
    metric = M.SegmentationMeanIoU(num_classes=3)
    metric.update_state(y_true, logits)
    # class 0: TP 1, FP 1 (pixel (1,1)), FN 1 (pixel (0,1)) -> 1/3
    # class 1: TP 2, FP 1, FN 1 -> 2/4
    # class 2: no label, no counted prediction -> does not occur, not averaged
    assert _value(metric) == pytest.approx((1 / 3 + 2 / 4) / 2, abs=1e-6)
    per_class = keras.ops.convert_to_numpy(metric.per_class_iou())
    assert per_class[0] == pytest.approx(1 / 3) and per_class[1] == pytest.approx(0.5)
    assert np.isnan(per_class[2])


def test_mean_iou_accumulates_over_batches_and_resets():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, (4, 6, 7))
    y_true[0, 0] = 255
    logits = rng.normal(size=(4, 6, 7, 5)).astype("float32")
    whole = M.SegmentationMeanIoU(5)
    whole.update_state(y_true, logits)
    parts = M.SegmentationMeanIoU(5)
    parts.update_state(y_true[:1], logits[:1])
    parts.update_state(y_true[1:, ..., None], logits[1:])  # (B, H, W, 1) labels too
    assert _value(parts) == pytest.approx(_value(whole), abs=1e-6)
    # sklearn-free reference: the confusion matrix from numpy
    valid = y_true != 255
    pred = logits.argmax(-1)
    ious = []
    for c in range(5):
        tp = np.sum((y_true == c) & (pred == c) & valid)
        union = np.sum(((y_true == c) | (pred == c)) & valid)
        if union:
            ious.append(tp / union)
    assert _value(whole) == pytest.approx(np.mean(ious), abs=1e-6)
    whole.reset_state()
    assert _value(whole) == 0.0
    perfect = M.SegmentationMeanIoU(5)
    perfect.update_state(y_true, np.eye(5, dtype="float32")[np.where(valid, y_true, 0)])
    assert _value(perfect) == pytest.approx(1.0)


def test_mean_iou_sample_weight_drops_an_image():
    y_true = np.array([[[0, 1]], [[1, 1]]])
    y_pred = np.array([[[0, 1]], [[0, 0]]])
    metric = M.SegmentationMeanIoU(2)
    metric.update_state(y_true, y_pred, sample_weight=np.array([1.0, 0.0]))
    assert _value(metric) == pytest.approx(1.0)  # class ids are accepted as predictions


def test_instance_offset_error_is_mean_abs_over_instance_pixels():
    y_true = np.zeros((1, 2, 2, 3), "float32")
    y_true[0, 0, 0] = [1.0, -2.0, 1.0]
    y_true[0, 1, 1] = [0.5, 0.5, 1.0]
    y_true[0, 0, 1] = [0.0, 0.0, 0.0]  # not an instance: any prediction is free
    y_pred = np.zeros((1, 2, 2, 2), "float32")
    y_pred[0, 0, 0] = [2.0, -2.0]  # errors 1, 0
    y_pred[0, 1, 1] = [0.5, -0.5]  # errors 0, 1
    y_pred[0, 0, 1] = [100.0, 100.0]
    metric = M.InstanceOffsetError()
    metric.update_state(y_true, y_pred)
    assert _value(metric) == pytest.approx(2.0 / 4.0)
    loss = km.models.InstanceOffsetLoss()(y_true, y_pred)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(2.0 / 4.0, abs=1e-6)


def test_disparity_error_ignores_pixels_without_measurement():
    y_true = np.array([[[[0.0], [10.0]], [[20.0], [0.0]]]], "float32")
    y_pred = np.array([[[[5.0], [12.0]], [[17.0], [-9.0]]]], "float32")
    metric = M.DisparityError()
    metric.update_state(y_true, y_pred)
    assert _value(metric) == pytest.approx((2.0 + 3.0) / 2)
    loss = km.models.DisparityLoss()(y_true, y_pred)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(2.5, abs=1e-6)
    empty = M.DisparityError()
    empty.update_state(np.zeros_like(y_true), y_pred)
    assert _value(empty) == 0.0


def test_masked_losses_average_over_the_batch_not_per_image():
    # Image 1 has 1 valid pixel with error 4, image 2 has 3 with error 0:
    # the authors' loss is 4 / 4 = 1, not the mean of the per-image means (2).
    y_true = np.zeros((2, 1, 4, 1), "float32")
    y_true[0, 0, 0] = 1.0
    y_true[1, 0, :3] = 1.0
    y_pred = y_true.copy()
    y_pred[0, 0, 0] = 5.0
    loss = km.models.DisparityLoss()(y_true, y_pred)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(1.0, abs=1e-6)


def test_binary_error_rate_on_logits_and_probabilities():
    y_true = np.array([[1.0], [0.0], [1.0], [0.0]])
    logits = np.array([[2.0], [-1.0], [-0.5], [0.3]], "float32")  # 2 wrong
    metric = M.BinaryErrorRate()
    metric.update_state(y_true, logits)
    assert _value(metric) == pytest.approx(0.5)
    probabilities = M.BinaryErrorRate(from_logits=False)
    probabilities.update_state(y_true, np.array([[0.9], [0.1], [0.8], [0.2]], "float32"))
    assert _value(probabilities) == 0.0
    weighted = M.BinaryErrorRate()
    weighted.update_state(y_true, logits, sample_weight=np.array([1.0, 1.0, 0.0, 0.0]))
    assert _value(weighted) == 0.0


@pytest.mark.parametrize(
    "metric",
    [
        M.SegmentationMeanIoU(7, ignore_class=None, name="iou7"),
        M.InstanceOffsetError(name="inst"),
        M.DisparityError(),
        M.BinaryErrorRate(from_logits=False, threshold=0.3),
    ],
)
def test_metrics_serialize(metric):
    config = keras.saving.serialize_keras_object(metric)
    assert config["module"] == "keras_mgda" or "keras_mgda" in str(config)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(metric)
    assert restored.get_config() == metric.get_config()


@pytest.mark.one_backend
def test_delta_m_by_hand():
    scores = {"miou": 0.66, "instance": 10.0, "disparity": 3.0}
    baselines = {"miou": 0.60, "instance": 12.5, "disparity": 2.5}
    lower = {"miou": False, "instance": True, "disparity": True}
    # +0.1 (IoU up 10%), +0.2 (error down 20%), -0.2 (error up 20%)
    assert M.delta_m(scores, baselines, lower) == pytest.approx((0.1 + 0.2 - 0.2) / 3)
    assert M.delta_m([0.9, 0.8], [0.9, 0.8]) == 0.0
    assert M.delta_m([8.25], [8.77], lower_is_better=True) == pytest.approx((8.77 - 8.25) / 8.77)


@pytest.mark.one_backend
def test_delta_m_properties():
    rng = np.random.default_rng(0)
    baselines = rng.uniform(0.5, 2.0, 5)
    flags = [True, False, True, False, False]
    better = np.where(flags, baselines * 0.9, baselines * 1.1)  # every task improves
    worse = np.where(flags, baselines * 1.1, baselines * 0.9)
    assert M.delta_m(better, baselines, flags) > 0 > M.delta_m(worse, baselines, flags)
    # Scale-free: units do not matter.
    assert M.delta_m(better * 7.0, baselines * 7.0, flags) == pytest.approx(M.delta_m(better, baselines, flags))
    # Order-free for dicts.
    names = list("abcde")
    forward = M.delta_m(dict(zip(names, better)), dict(zip(names, baselines)), dict(zip(names, flags)))
    backward = M.delta_m(
        dict(zip(names[::-1], better[::-1])), dict(zip(names[::-1], baselines[::-1])), dict(zip(names, flags))
    )
    assert forward == pytest.approx(backward)


@pytest.mark.one_backend
def test_delta_m_errors():
    with pytest.raises(ValueError, match="same metrics"):
        M.delta_m({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="length"):
        M.delta_m([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="undefined"):
        M.delta_m([1.0], [0.0])
    with pytest.raises(ValueError, match="lower_is_better"):
        M.delta_m({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, {"a": True})
