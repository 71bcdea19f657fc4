"""One error for bad data, on every backend, compiled and eager.

The matrix: a NaN feature (it reaches every head, torch's binary
cross-entropy refuses it with its own RuntimeError, TensorFlow's fused
Dense + ReLU may swallow it in a graph), an infinite target, a class
label out of range, an error inside a custom loss and inside a custom
metric. Each gives the same error type and message on TensorFlow, JAX and
torch, with `run_eagerly` on and off: `FloatingPointError` saying which
data holds NaN or Inf and naming the task (or the input features),
`ValueError` for labels out of range, and the original type with the task
named for an error of the user's code. Every variable of the model, the
optimizer and the metrics is left as it was.

One trained model per mode serves every data case (a failed step changes
nothing, which each case asserts).
"""

import keras
import numpy as np
import pytest
from test_bad_input import N
from test_bad_input import assert_unchanged
from test_bad_input import build
from test_bad_input import data
from test_bad_input import state

MODES = {"compiled": False, "eager": True}


def nan_feature(x, y):
    x = x.copy()
    x[5, 3] = np.nan
    return x, y


def inf_target(x, y):
    y = dict(y, reg=y["reg"].copy())
    y["reg"][7] = np.inf
    return x, y


def label_out_of_range(x, y):
    y = dict(y, cls=y["cls"].copy())
    y["cls"][3] = 7
    return x, y


# Case: (bad batch, error type, message pattern).
DATA_CASES = {
    "nan_feature": (
        nan_feature, FloatingPointError, r"\(the input features hold NaN or Inf\).*Task: none \(the input features\)"
    ),
    "inf_target": (inf_target, FloatingPointError, r"\(task 'reg': its target holds NaN or Inf\).*Task: reg$"),
    "label_out_of_range": (
        label_out_of_range, ValueError, r"task 'cls': its target holds class labels outside \[0, 4\).*Task: cls$"
    ),
}


@pytest.fixture(scope="module", params=sorted(MODES))
def trained_model(request):
    model = build(run_eagerly=MODES[request.param])
    model.fit(*data(), batch_size=N, epochs=1, verbose=0, shuffle=False)
    return model


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_gives_one_error(trained_model, case):
    corrupt, error_type, pattern = DATA_CASES[case]
    before = state(trained_model)
    with pytest.raises(error_type, match=pattern) as raised:
        trained_model.fit(*corrupt(*data(1)), batch_size=N, epochs=1, verbose=0, shuffle=False)
    assert type(raised.value) is error_type
    assert_unchanged(before, trained_model)


def broken_loss(y_true, y_pred):
    raise KeyError("a bug in the custom loss")


class BrokenMetric(keras.metrics.Metric):
    def update_state(self, y_true, y_pred, sample_weight=None):
        raise TypeError("a bug in the custom metric")

    def result(self):
        return 0.0


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("what", ["loss", "metric"])
def test_an_error_in_user_code_keeps_its_type_and_names_the_task(mode, what):
    losses = {"reg": "mse", "cls": "sparse_categorical_crossentropy", "bin": "binary_crossentropy"}
    metrics = None
    if what == "loss":
        losses["reg"], task, error_type = broken_loss, "reg", KeyError
    else:
        metrics, task, error_type = {"cls": [BrokenMetric(name="broken")]}, "cls", TypeError
    model = build()
    model.compile(optimizer="sgd", loss=losses, metrics=metrics, run_eagerly=MODES[mode])
    before = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.variables}
    with pytest.raises(error_type, match=rf"the {what} of task '{task}' raised: .*a bug in the custom {what}"):
        model.fit(*data(1), batch_size=N, epochs=1, verbose=0)
    for v in model.variables:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), before[v.path], err_msg=v.path)
