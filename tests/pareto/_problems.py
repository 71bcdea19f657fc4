"""Small multi-task models the Pareto tests explore.

- `Quadratic`: T quadratic objectives f_i(theta) = (theta - a_i) A_i
  (theta - a_i)^T / d of shared parameters theta (d of them) with
  different curvatures A_i = B_i B_i^T, as a `MultiTaskModel` with Keras's
  `mse`: the shared layer's kernel is theta (its input is a column of ones),
  head i is a fixed (non-trainable) linear map B_i, its target a_i B_i. The
  Pareto set is {argmin sum_i lambda_i f_i} = {(sum lambda_i A_i)^-1
  sum lambda_i A_i a_i}, in closed form.
- `small_model`: a little network with BatchNorm and dropout and T tasks
  (regression and classification), briefly trained.
"""

import keras
import numpy as np

import keras_mgda as km
from keras_mgda.backend import numpy_ops

__all__ = ["Quadratic", "small_model"]


class Quadratic:
    """T quadratics of d shared parameters with a known Pareto set.

    Args:
        num_tasks: T.
        dim: d.
        seed: the curvatures' and minima's seed.
        examples: rows of the (constant) data: the losses do not depend on
            it, only the batching does.
    """

    def __init__(self, num_tasks=2, dim=3, seed=0, examples=8):
        rng = np.random.default_rng(seed)
        self.dim = dim
        # Condition numbers of about 1 to 10, minima about 2 apart.
        self.b = [np.linalg.qr(rng.normal(size=(dim, dim)))[0] * rng.uniform(0.6, 1.8, dim) for _ in range(num_tasks)]
        self.a = [rng.normal(size=dim) for _ in range(num_tasks)]
        self.curvatures = [b @ b.T for b in self.b]
        self.x = np.ones((examples, 1), np.float32)
        self.y = {f"t{i}": np.tile((a @ b)[None], (examples, 1)).astype(np.float32) for i, (a, b) in
                  enumerate(zip(self.a, self.b))}

    def pareto_point(self, lambdas):
        """theta*(lambda) = argmin sum_i lambda_i f_i."""
        matrix = sum(w * c for w, c in zip(lambdas, self.curvatures))
        return np.linalg.solve(matrix, sum(w * c @ a for w, c, a in zip(lambdas, self.curvatures, self.a)))

    def losses(self, theta):
        return np.array([(theta - a) @ c @ (theta - a) / self.dim for a, c in zip(self.a, self.curvatures)])

    def gradients(self, theta):
        return np.stack([2.0 * c @ (theta - a) / self.dim for a, c in zip(self.a, self.curvatures)])

    def model(self, lambdas=None):
        """The problem as a compiled `MultiTaskModel`, at theta*(lambdas)
        (uniform weights by default)."""
        num_tasks = len(self.a)
        lambdas = np.full(num_tasks, 1.0 / num_tasks) if lambdas is None else lambdas
        inputs = keras.Input((1,))
        z = keras.layers.Dense(self.dim, use_bias=False, name="theta")(inputs)
        heads = [keras.layers.Dense(self.dim, use_bias=False, trainable=False, name=f"t{i}") for i in range(num_tasks)]
        model = km.MultiTaskModel(inputs, {f"t{i}": h(z) for i, h in enumerate(heads)})
        model.compile("sgd", loss="mse")
        model.get_layer("theta").kernel.assign(self.pareto_point(lambdas)[None].astype(np.float32))
        for h, b in zip(heads, self.b):
            h.kernel.assign(b.astype(np.float32))
        return model

    def front_distance(self, theta):
        """An upper bound on the distance of f(theta) to the Pareto front,
        relative to |f(theta)|: the distance to f(theta*(lambda)) for the
        min-norm weights lambda of the gradients at theta."""
        g = self.gradients(theta)
        lambdas = km.solvers.min_norm(g @ g.T, ops=numpy_ops)
        f = self.losses(theta)
        return float(np.linalg.norm(f - self.losses(self.pareto_point(lambdas))) / np.linalg.norm(f))


def small_model(num_tasks=3, seed=0, examples=64, epochs=0):
    """A network with BatchNorm (moving statistics away from 0 and 1) and
    dropout and `num_tasks` tasks (alternately `mse` regressions and
    3-class classifications), trained for `epochs` with MGDA-UB; returns
    the model, its inputs and its targets."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    x = rng.normal(size=(examples, 5)).astype(np.float32)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    norm = keras.layers.BatchNormalization()
    h = norm(h)
    h = keras.layers.Dropout(0.3)(h)
    z = keras.layers.Dense(6, activation="tanh", name="shared")(h)
    outputs, losses, y = {}, {}, {}
    for t in range(num_tasks):
        name = f"task{t}"
        if t % 2 == 0:
            outputs[name] = keras.layers.Dense(1, name=name)(keras.layers.Dropout(0.2)(z))
            losses[name] = "mse"
            y[name] = (x[:, :1] * (t + 1) + 0.1 * rng.normal(size=(examples, 1))).astype(np.float32)
        else:
            outputs[name] = keras.layers.Dense(3, name=name)(z)
            losses[name] = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            y[name] = rng.integers(0, 3, examples).astype(np.int32)
    model = km.MGDAModel(inputs, outputs)
    metrics = {name: ["mae"] if t % 2 == 0 else ["accuracy"] for t, name in enumerate(outputs)}
    model.compile(keras.optimizers.SGD(0.05), loss=losses, metrics=metrics)
    norm.moving_mean.assign(rng.normal(size=8) * 0.3)
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, 8))
    if epochs:
        model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    return model, x, y


def tiny_model(seed=0, examples=24, batch_norm=True):
    """A tiny two-task network (55 weights, 63 with BatchNorm) with dropout
    and BatchNorm (moving statistics set away from 0 and 1), in the current
    floatx, compiled with `loss_weights` and metrics; never trained.
    Returns the model and one batch `(x, y)` of backend tensors.

    Keras's BatchNormalization computes in float32 on torch and JAX even in
    a float64 model, so float64 tests that need 1e-7 leave it out."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    norm = keras.layers.BatchNormalization(name="norm") if batch_norm else None
    h = keras.layers.Dropout(0.5)(norm(h) if batch_norm else h)
    z = keras.layers.Dense(3, activation="tanh", name="shared")(h)
    outputs = {"a": keras.layers.Dense(1, name="a")(z), "b": keras.layers.Dense(3, name="b")(z)}
    model = km.MultiTaskModel(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.1),
        loss={"a": "mse", "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        loss_weights={"a": 1.0, "b": 0.5},
        metrics={"a": ["mae"], "b": ["accuracy"]},
    )
    if batch_norm:
        norm.moving_mean.assign(rng.normal(size=4) * 0.3)
        norm.moving_variance.assign(rng.uniform(0.5, 2.0, 4))
    dtype = keras.config.floatx()
    x = keras.ops.convert_to_tensor(rng.normal(size=(examples, 5)), dtype)
    y = {
        "a": keras.ops.convert_to_tensor(rng.normal(size=(examples, 1)), dtype),
        "b": keras.ops.convert_to_tensor(rng.integers(0, 3, examples), "int32"),
    }
    model.step_plan_for((x, y))
    return model, (x, y)


class Saddle:
    """Two tasks of two shared parameters theta whose alpha-weighted Hessian
    is indefinite at a Pareto-stationary start, so that the undamped
    exploration direction for beta = e_0 points uphill:

        f_0 = (theta_0 - 1)^2 + 3 theta_1 - theta_1^2,
        f_1 = (theta_0 + 1)^2 - 3 theta_1 - theta_1^2.

    At theta = 0 the gradients (-2, 3) and (2, -3) cancel at alpha = (1/2,
    1/2), and H = diag(2, -2). With J^T e_0 = (-2, 3), the damped direction
    v = (H + damping I)^-1 J^T e_0 = (-2 / (2 + d), 3 / (d - 2)) has
    <J^T e_0, v> = 4 / (2 + d) + 9 / (d - 2): negative for every d in
    [0, 2), positive for d > 2.
    """

    hessian = np.diag([2.0, -2.0])

    def __init__(self, examples=4):
        self.x = np.ones((examples, 1), np.float32)
        self.y = {f"t{i}": np.zeros((examples, 2), np.float32) for i in range(2)}

    @staticmethod
    def losses(theta):
        a, b = theta
        return np.array([(a - 1) ** 2 + 3 * b - b**2, (a + 1) ** 2 - 3 * b - b**2])

    @staticmethod
    def gradients(theta):
        a, b = theta
        return np.array([[2 * (a - 1), 3 - 2 * b], [2 * (a + 1), -3 - 2 * b]])

    @staticmethod
    def _loss(sign):
        def loss(y_true, y_pred):
            a, b = y_pred[:, 0], y_pred[:, 1]
            return (a - sign) ** 2 + sign * 3.0 * b - b * b + 0.0 * keras.ops.sum(y_true, axis=-1)

        return loss

    def model(self):
        """The problem as a compiled `MultiTaskModel` at theta = 0."""
        inputs = keras.Input((1,))
        z = keras.layers.Dense(2, use_bias=False, kernel_initializer="zeros", name="theta")(inputs)
        heads = [keras.layers.Dense(2, use_bias=False, trainable=False, kernel_initializer="identity", name=f"t{i}")
                 for i in range(2)]
        model = km.MultiTaskModel(inputs, {f"t{i}": h(z) for i, h in enumerate(heads)})
        model.compile("sgd", loss={"t0": self._loss(1.0), "t1": self._loss(-1.0)})
        return model
