"""The same model, initial weights and batch give the same alpha and the
same updated weights on TensorFlow, JAX and PyTorch (alpha to 1e-5,
weights to 1e-4 relative). Each backend runs in its own process; the test
runs once, under the torch suite (the shortest), when all three are
installed."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

BACKENDS = ("tensorflow", "jax", "torch")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import keras_mgda as km

    rng = np.random.default_rng(0)
    x = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="t1")(x)
    z = keras.layers.Dense(5, activation="tanh", name="trunk",
                           kernel_regularizer=keras.regularizers.L2(1e-3))(h)
    a = keras.layers.Dense(1, name="a")(keras.layers.Dense(4, activation="tanh", name="ah")(z))
    b = keras.layers.Dense(3, activation="softmax", name="b")(z)
    c = keras.layers.Dense(1, name="c")(z)
    model = km.MultiTaskModel(x, {"a": a, "b": b, "c": c},
                              weighting=km.weighting.MGDA(mode=sys.argv[1]))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(scale=0.7, size=w.shape).astype("float32")
                               for w in layer.weights])
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss={"a": "mse", "b": "sparse_categorical_crossentropy",
                        "c": keras.losses.BinaryCrossentropy(from_logits=True)},
                  loss_weights={"a": 1.0, "b": 0.5, "c": 2.0})
    data = np.random.default_rng(1)
    xs = data.normal(size=(32, 6)).astype("float32")
    ys = {"a": data.normal(size=(32, 1)).astype("float32"),
          "b": data.integers(0, 3, size=(32,)).astype("int32"),
          "c": data.integers(0, 2, size=(32, 1)).astype("float32")}
    alphas = []
    for start in (0, 16):
        logs = model.train_on_batch(xs[start:start + 16], {k: v[start:start + 16] for k, v in ys.items()},
                                    return_dict=True)
        alphas.append([logs[f"{t}_alpha"] for t in "abc"])
    print("RESULT " + json.dumps({"alphas": alphas,
                                  "weights": [w.tolist() for w in model.get_weights()]}))
    """
)


def _run(backend, mode, tmp_path):
    script = tmp_path / "cross_backend.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, str(script), mode], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(
    keras.backend.backend() != "torch"
    or any(importlib.util.find_spec(m) is None for m in ("jax", "tensorflow")),
    reason="runs once, with all three backends installed",
)
@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_same_step_on_every_backend(mode, tmp_path):
    results = {backend: _run(backend, mode, tmp_path) for backend in BACKENDS}
    reference = results["tensorflow"]
    for backend in ("jax", "torch"):
        got = results[backend]
        np.testing.assert_allclose(got["alphas"], reference["alphas"], atol=1e-5, err_msg=backend)
        for w, w_ref in zip(got["weights"], reference["weights"], strict=True):
            w, w_ref = np.asarray(w), np.asarray(w_ref)
            assert np.linalg.norm(w - w_ref) <= 1e-4 * np.linalg.norm(w_ref), backend
