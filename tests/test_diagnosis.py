"""`keras_mgda.step.diagnosis.diagnose` against the rule it
states: a task's target, labels or sample weights first (the first such
task in task order), then the input features, then the predictions. Its
checks run once per group of same-shaped values: the groups must not
change which task is named."""

import keras
import numpy as np
import pytest

from keras_mgda.step import diagnosis

pytestmark = pytest.mark.one_backend


def _recorded(targets, predictions, sample_weights, labels):
    recorded = {}
    for index, (target, prediction, weight, label) in enumerate(
        zip(targets, predictions, sample_weights, labels, strict=True)
    ):
        recorded[diagnosis.data_key(index)] = (target, prediction, weight)
        if label is not None:
            recorded[diagnosis.labels_key(index)] = label
    return recorded


def _tasks(rng):
    """Four tasks: 0 and 2 alike (class labels of 4 classes), 1 and 3 alike
    (float targets), task 3 with sample weights."""
    labels = lambda: rng.integers(0, 4, size=(8,)).astype("int32")  # noqa: E731
    floats = lambda: rng.normal(size=(8, 3)).astype("float32")  # noqa: E731
    targets = [labels(), floats(), labels(), floats()]
    predictions = [floats(), floats(), floats(), floats()]
    weights = [None, None, None, np.ones(8, "float32")]
    label_info = [(4, None), None, (4, None), None]
    return targets, predictions, weights, label_info


def _diagnose(targets, predictions, weights, labels, inputs):
    task, cause = diagnosis.diagnose(
        _recorded(targets, predictions, weights, labels), 4, inputs, ops=keras.ops
    )
    return int(task), int(cause)


@pytest.mark.parametrize(
    "spoil, expected",
    [
        ({}, (4, 0)),
        ({("target", 2): 9}, (2, diagnosis.LABELS)),
        ({("target", 3): np.nan, ("target", 2): -1}, (2, diagnosis.LABELS)),
        ({("target", 1): np.inf, ("target", 2): 7}, (1, diagnosis.TARGET)),
        ({("weight", 3): np.nan}, (3, diagnosis.SAMPLE_WEIGHT)),
        ({("weight", 3): np.nan, ("target", 3): np.nan}, (3, diagnosis.TARGET)),
        ({("prediction", 3): np.nan, ("prediction", 2): np.inf}, (2, diagnosis.PREDICTION)),
        ({("inputs", 0): np.nan, ("prediction", 1): np.nan}, (4, diagnosis.INPUTS)),
        ({("prediction", 0): np.nan, ("target", 3): np.inf}, (3, diagnosis.TARGET)),
    ],
)
def test_the_first_task_in_order_whatever_its_group(spoil, expected):
    rng = np.random.default_rng(0)
    targets, predictions, weights, labels = _tasks(rng)
    inputs = rng.normal(size=(8, 5)).astype("float32")
    for (kind, task), value in spoil.items():
        array = {"target": targets, "prediction": predictions, "weight": weights}.get(kind, [inputs])[task]
        array.flat[3] = value
    assert _diagnose(targets, predictions, weights, labels, inputs) == expected


def test_ignore_class_is_a_valid_label_and_differs_per_task():
    """Tasks with the same label shape but different `ignore_class` are
    checked each against its own."""
    rng = np.random.default_rng(1)
    targets, predictions, weights, labels = _tasks(rng)
    labels[0], labels[2] = (4, 255), (4, None)
    targets[0][0] = 255
    assert _diagnose(targets, predictions, weights, labels, None) == (4, 0)
    targets[2][0] = 255
    assert _diagnose(targets, predictions, weights, labels, None) == (2, diagnosis.LABELS)
