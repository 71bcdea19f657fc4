"""A tiny three-task model for the aggregators' `fit` tests, and a NumPy
reference of its forward pass and gradients.

x (6) -> trunk Dense(5, sigmoid) = Z -> heads a: Dense(1) (MSE), b:
Dense(3) (sparse cross-entropy on logits), c: Dense(1) (MSE); plain SGD.
Z is a sigmoid, so sign(Z) = 1 everywhere (GradDrop's batch-separated
purity is then the same with or without the signs of Z).
"""

import keras
import numpy as np

import keras_mgda as km

__all__ = ["LR", "TASKS", "Reference", "data", "model", "weights_of"]

LR = 0.1
TASKS = ("a", "b", "c")


def model(weighting, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,))
    z = keras.layers.Dense(5, activation="sigmoid", name="trunk")(x)
    outputs = {
        "a": keras.layers.Dense(1, name="a")(z),
        "b": keras.layers.Dense(3, name="b")(z),
        "c": keras.layers.Dense(1, name="c")(z),
    }
    result = km.MultiTaskModel(x, outputs, weighting=weighting)
    result.compile(
        keras.optimizers.SGD(LR),
        loss={"a": "mse", "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "c": "mse"},
    )
    return result


def data(n=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = {
        "a": rng.normal(size=(n, 1)).astype("float32"),
        "b": rng.integers(0, 3, size=(n,)).astype("int32"),
        "c": rng.normal(size=(n, 1)).astype("float32"),
    }
    return x, y


def weights_of(model):
    """{layer name: [kernel, bias]} as float64 arrays."""
    return {
        name: [np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in model.get_layer(name).weights]
        for name in ("trunk",) + TASKS
    }


class Reference:
    """One step of the tiny model in float64 NumPy, from given weights."""

    def __init__(self, weights, x, y):
        self.w = {k: [a.copy() for a in v] for k, v in weights.items()}
        self.x = np.asarray(x, np.float64)
        self.y = y

    def forward(self):
        kernel, bias = self.w["trunk"]
        self.z = 1.0 / (1.0 + np.exp(-(self.x @ kernel + bias)))
        self.out = {t: self.z @ self.w[t][0] + self.w[t][1] for t in TASKS}

    def output_gradients(self):
        """dL_t/d(output_t) for each task, and the losses."""
        n = len(self.x)
        grads, losses = {}, []
        for t in ("a", "c"):
            diff = self.out[t] - self.y[t]
            losses.append(np.mean(diff**2))
            grads[t] = 2.0 * diff / diff.size
        logits = self.out["b"] - self.out["b"].max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        onehot = np.eye(3)[self.y["b"]]
        losses.insert(1, -np.mean(np.log((probs * onehot).sum(axis=1))))
        grads["b"] = (probs - onehot) / n
        return grads, np.array(losses)

    def task_gradients(self):
        """Per task: dL_t/dZ (B, 5), the head's [kernel, bias] gradients,
        and the trunk's [kernel, bias] gradients; the losses."""
        self.forward()
        grads, losses = self.output_gradients()
        per_task = []
        for t in TASKS:
            dz = grads[t] @ self.w[t][0].T
            head = [self.z.T @ grads[t], grads[t].sum(axis=0)]
            per_task.append((dz, head, self.trunk_gradients(dz)))
        return per_task, losses

    def trunk_gradients(self, cotangent):
        """The trunk's [kernel, bias] gradients for a cotangent of Z."""
        pre = cotangent * self.z * (1.0 - self.z)
        return [self.x.T @ pre, pre.sum(axis=0)]

    def apply(self, trunk_grads, head_grads):
        """SGD: the trunk's and each head's [kernel, bias] gradients."""
        for i in range(2):
            self.w["trunk"][i] -= LR * trunk_grads[i]
        for t, grads in zip(TASKS, head_grads, strict=True):
            for i in range(2):
                self.w[t][i] -= LR * grads[i]
