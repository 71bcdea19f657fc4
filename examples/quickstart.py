"""Train MGDA-UB on a two-task problem and print per-task results.

Two tasks share a small trunk: a regression task and a classification task
built on partly conflicting directions of the same features. The script
trains the same network with MGDA-UB and with uniform loss weights, from the
same initial weights, and prints each task's test loss and the final task
weights (alpha).

Usage:
    python examples/quickstart.py [--epochs 10] [--backend-note]
"""

import argparse

import keras
import numpy as np

import keras_mgda as km


def make_data(n, seed):
    # The task directions are fixed; only the samples depend on the seed.
    task_rng = np.random.default_rng(1234)
    direction = task_rng.normal(size=(20,))
    conflicting = -direction + 0.5 * task_rng.normal(size=(20,))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20)).astype("float32")
    y_reg = (x @ direction + 0.1 * rng.normal(size=n)).astype("float32")[:, None]
    y_cls = np.digitize(x @ conflicting, [-2.0, 0.0, 2.0]).astype("int32")
    return x, {"value": y_reg, "bucket": y_cls}


def build(weighting, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((20,), name="features")
    h = keras.layers.Dense(64, activation="relu")(x)
    z = keras.layers.Dense(32, activation="relu", name="shared")(h)
    value = keras.layers.Dense(1, name="value")(keras.layers.Dense(32, activation="relu")(z))
    bucket = keras.layers.Dense(4, name="bucket")(keras.layers.Dense(32, activation="relu")(z))
    model = km.MultiTaskModel(x, {"value": value, "bucket": bucket}, weighting=weighting)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss={
            "value": "mse",
            "bucket": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        },
        metrics={"bucket": ["accuracy"]},
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x_train, y_train = make_data(8192, seed=1)
    x_test, y_test = make_data(2048, seed=2)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    for name, weighting in [("MGDA-UB", km.weighting.MGDA()), ("uniform", km.weighting.Uniform())]:
        model = build(weighting, args.seed)
        history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=256, verbose=0)
        scores = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
        alphas = {t: round(history.history[f"{t}_alpha"][-1], 3) for t in model.task_names}
        print(
            f"{name:8s} test value mse {scores['value_loss']:.4f} | "
            f"bucket loss {scores['bucket_loss']:.4f}, accuracy {scores['bucket_accuracy']:.4f} | "
            f"last-epoch alpha {alphas}"
        )


if __name__ == "__main__":
    main()
