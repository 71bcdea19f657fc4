"""One process of `test_compilation_cache.py`: fits a small
`MultiTaskModel` (three tasks, MGDA) for one epoch on JAX, with JAX's
persistent compilation cache taken from the environment, and writes its
cache hits and misses and the trained weights to `argv[1]` (.npz)."""

import sys

import jax

counts = {"hits": 0, "misses": 0}


def _count(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1


jax.monitoring.register_event_listener(_count)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mgda as km  # noqa: E402


def main(path):
    keras.utils.set_random_seed(0)
    x = keras.Input((6,))
    z = keras.layers.Dense(8, activation="relu")(x)
    outputs = {name: keras.layers.Dense(1, name=name)(z) for name in ("a", "b", "c")}
    model = km.MultiTaskModel(x, outputs, weighting=km.weighting.MGDA())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(32, 6)).astype("float32")
    targets = {name: rng.normal(size=(32, 1)).astype("float32") for name in outputs}
    model.fit(data, targets, batch_size=8, epochs=1, verbose=0, shuffle=False)
    weights = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    np.savez(path, hits=counts["hits"], misses=counts["misses"], **weights)


if __name__ == "__main__":
    main(sys.argv[1])
