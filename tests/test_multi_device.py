"""Data-parallel training solves the same global problem as one device:
with 2 replicas (TF: 2 logical CPUs under MirroredStrategy; JAX: 2 host
devices under keras.distribution.DataParallel), alpha and the updated
weights equal those of one device on the same global batch.

Each device count runs in a fresh Python process, since it must be set
before the backend starts; one process trains every case (CASES)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    replicas = int(sys.argv[1])
    backend = os.environ["KERAS_BACKEND"]
    if backend == "tensorflow":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import keras_mgda as km

    def build(normalization, mode):
        rng = np.random.default_rng(0)
        x = keras.Input((6,))
        z = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
        a = keras.layers.Dense(1, name="a")(keras.layers.Dense(4, activation="tanh", name="ah")(z))
        b = keras.layers.Dense(3, name="b")(z)
        c = keras.layers.Dense(1, name="c")(z)
        model = km.MultiTaskModel(x, {"a": a, "b": b, "c": c},
                                  weighting=km.weighting.MGDA(normalization=normalization, mode=mode))
        for layer in model.layers:
            if layer.weights:
                layer.set_weights([rng.normal(scale=0.7, size=w.shape).astype("float32")
                                   for w in layer.weights])
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss={"a": "mse",
                  "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  "c": keras.losses.BinaryCrossentropy(from_logits=True)})
        return model

    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = {"a": rng.normal(size=(16, 1)).astype("float32"),
         "b": rng.integers(0, 3, size=(16,)).astype("int32"),
         "c": rng.integers(0, 2, size=(16, 1)).astype("float32")}
    if backend == "tensorflow" and replicas > 1:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
    elif backend == "jax" and replicas > 1:
        import jax
        assert len(jax.devices()) == 2, jax.devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    results = {}
    for case in sys.argv[2:]:
        normalization, mode = case.split(",")
        if backend == "tensorflow" and replicas > 1:
            with strategy.scope():
                model = build(normalization, mode)
        else:
            model = build(normalization, mode)
        initial = [w.tolist() for w in model.get_weights()]
        history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
        results[case] = {
            "alpha": [history[f"{t}_alpha"][0] for t in "abc"],
            "loss": history["loss"][0],
            "initial": initial,
            "weights": [w.tolist() for w in model.get_weights()],
        }
    print("RESULT " + json.dumps(results))
    """
)


CASES = [("loss+", "representation"), ("none", "parameters")]


def _run(replicas, tmp_path):
    """{"normalization,mode": result} of every case, trained on `replicas`
    devices in one fresh process."""
    env = dict(os.environ)
    if keras.backend.backend() == "jax":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={replicas}"
    script = tmp_path / "multi_device.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(replicas), *(",".join(case) for case in CASES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on one device and on two."""
    tmp_path = tmp_path_factory.mktemp("multi_device")
    return {replicas: _run(replicas, tmp_path) for replicas in (1, 2)}


@pytest.mark.skipif(
    keras.backend.backend() not in ("tensorflow", "jax"),
    reason="tf.distribute / keras.distribution (torch: tests/test_torch_distributed.py)",
)
@pytest.mark.parametrize("normalization,mode", CASES)
def test_two_replicas_solve_the_global_problem(normalization, mode, runs):
    case = f"{normalization},{mode}"
    one, two = runs[1][case], runs[2][case]
    np.testing.assert_allclose(two["alpha"], one["alpha"], atol=1e-5)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for start, w2, w1 in zip(one["initial"], two["weights"], one["weights"], strict=True):
        update_one = np.asarray(w1) - np.asarray(start)
        update_two = np.asarray(w2) - np.asarray(start)
        error = np.linalg.norm(update_two - update_one)
        assert error <= 1e-4 * max(np.linalg.norm(update_one), 1e-12)
