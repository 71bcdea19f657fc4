"""The Keras versions keras_mgda supports, and the private Keras names it
relies on (`keras_mgda/_keras.py`), checked against the installed Keras: a
release that moves one fails here, not in a user's training run."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_mgda as km
from keras_mgda import _keras

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained_model():
    """A two-task model after one `fit` epoch: compiled loss, trackers and
    the backend's trainer state all built."""
    keras.utils.set_random_seed(0)
    x = keras.Input((3,))
    z = keras.layers.Dense(4, activation="relu", name="shared")(x)
    outputs = {"a": keras.layers.Dense(1, name="a")(z), "b": keras.layers.Dense(1, name="b")(z)}
    model = km.MGDAModel(x, outputs)
    model.compile("sgd", loss={"a": "mse", "b": "mse"})
    data = np.ones((4, 3), "float32")
    model.fit(data, {"a": np.zeros((4, 1)), "b": np.ones((4, 1))}, batch_size=4, epochs=1, verbose=0)
    return model


def _tf_epoch_iterator():
    import tensorflow as tf
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    return TFEpochIterator(
        distribute_strategy=tf.distribute.get_strategy(), x=np.zeros((4, 2), "float32"), batch_size=2
    )


def _owner(model, owner):
    """A live object of the kind `owner` names."""
    if owner in ("Trainer", "Functional", "TensorFlowTrainer", "JAXTrainer"):
        return model
    if owner == "CompileLoss":
        return model._compile_loss
    if owner == "Layer":
        return model.get_layer("shared")
    if owner == "KerasTensor":
        return model.outputs[0]
    if owner == "TFEpochIterator":
        return _tf_epoch_iterator()
    if owner == "torch core":
        from keras.src.backend.torch import core

        return core
    raise AssertionError(f"No object for owner {owner!r}: add it to this test.")


@pytest.mark.parametrize("internal", _keras.INTERNALS, ids=lambda i: f"{i.owner}.{i.name}")
def test_private_keras_name_exists(trained_model, internal):
    if internal.backend not in (None, BACKEND):
        pytest.skip(f"{internal.owner}.{internal.name} exists on {internal.backend} only")
    owner = _owner(trained_model, internal.owner)
    assert hasattr(owner, internal.name), (
        f"Keras {keras.__version__} has no {internal.owner}.{internal.name} "
        f"({internal.note}); update keras_mgda/_keras.py"
    )


def test_every_private_name_is_noted():
    assert len({(i.owner, i.name) for i in _keras.INTERNALS}) == len(_keras.INTERNALS)
    for internal in _keras.INTERNALS:
        assert internal.name.startswith("_") or internal.owner in ("JAXTrainer", "torch core")
        assert internal.note and internal.backend in (None, "tensorflow", "jax", "torch")


# The trainer hooks MultiTaskModel overrides: the one place outside _keras.py
# where their names may stand.
OVERRIDES = {"_symbolic_build": "model.py", "_maybe_symbolic_build": "model.py"}


@pytest.mark.skipif(BACKEND != "torch", reason="reads source files; one backend is enough")
def test_private_keras_names_are_read_in_keras_module_only():
    package = os.path.join(ROOT, "keras_mgda")
    names = [i.name for i in _keras.INTERNALS if i.name.startswith("_")]
    for folder, _, files in os.walk(package):
        for file in files:
            path = os.path.join(folder, file)
            if not file.endswith(".py") or path == os.path.join(package, "_keras.py"):
                continue
            source = open(path, encoding="utf-8").read()
            assert "keras.src" not in source, path
            for name in names:
                if OVERRIDES.get(name) == os.path.relpath(path, package):
                    continue
                assert not re.search(rf"[.\"']{name}\b", source), f"{path} reads {name}: go through _keras.py"


def test_flat_losses_entries_have_the_fields_read(trained_model):
    entries = _keras.flat_losses(_keras.compile_loss(trained_model))
    assert [entry.name for entry in entries] == ["a", "b"]
    for entry in entries:
        assert {"path", "loss", "loss_weights", "name"} <= set(entry._fields)


def test_keras_history_leads_to_the_producing_layer(trained_model):
    operation, node_index, _ = _keras.keras_history(trained_model.outputs[0])
    assert operation.name in ("a", "b")
    node = _keras.inbound_nodes(operation)[node_index]
    assert node.operation is operation


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's detached training state")
def test_set_jax_state_writes_the_variables(trained_model):
    model = trained_model
    trainable = [np.full(v.shape, 0.25, v.dtype) for v in model.trainable_variables]
    state = (
        trainable,
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    _keras.set_jax_state(model, state)
    for variable in model.trainable_variables:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), 0.25)


# The supported Keras versions ----------------------------------------------

FLOOR = ".".join(map(str, _keras.KERAS_FLOOR))


@pytest.mark.parametrize("version", ["3.9.2", "3.0.0", "2.15.0"])
def test_keras_below_the_floor_is_refused(version):
    with pytest.raises(ImportError) as raised:
        _keras.check_version(version)
    message = str(raised.value)
    assert f"Keras {version} is installed" in message
    assert f"Keras {FLOOR} or newer" in message
    assert f'pip install --upgrade "keras>={FLOOR}"' in message


@pytest.mark.parametrize("version", [f"{FLOOR}.0", "3.15.1", "3.16.0.dev2027010103", "4.0.0"])
def test_keras_from_the_floor_on_is_accepted(version):
    _keras.check_version(version)


def test_the_installed_keras_is_supported():
    installed = _keras._version_tuple(keras.__version__)
    assert installed >= _keras.KERAS_FLOOR


@pytest.mark.skipif(BACKEND != "torch", reason="the import itself; one backend is enough")
def test_import_with_an_old_keras_raises_the_clear_error():
    """`import keras_mgda` itself refuses, before anything else can fail."""
    code = "import keras; keras.__version__ = '3.9.2'; import keras_mgda"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError: keras_mgda needs Keras" in result.stderr
    assert "Keras 3.9.2 is installed" in result.stderr
