"""Shared pieces of the weightings that read the Gram matrix of the task
gradients (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL, UPGrad).

Everything computes with the namespace of array functions it is given
(`ops`: `keras.ops` by default), with fixed shapes and capped loops, so the
methods run on TensorFlow, JAX and PyTorch, inside `tf.function` (XLA too)
and `jax.jit`, and on NumPy arrays in the eager torch step's host solve.
"""

from typing import Literal

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.weighting.base import GRADIENT_SPACES
from keras_mgda.weighting.base import Weighting

__all__ = ["HEAD_UPDATES", "GradientWeighting", "GramInput", "cap_factor", "check_cap", "check_choice"]

HEAD_UPDATES = ("scaled", "full")


def check_choice(name, value, choices):
    """Raises a ValueError naming the choices when `value` is not one."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; use one of {choices}.")


def check_cap(cap):
    """A weight cap: None, or a finite float > 0."""
    if cap is None:
        return None
    if not 0 < cap < float("inf"):
        raise ValueError(f"weight_cap must be finite and > 0, or None; got {cap!r}.")
    return float(cap)


def cap_factor(scores, cap, *, ops=keras.ops):
    """The factor min(1, cap / max(scores)) that scales non-negative
    `scores` down together to at most `cap` (1 when `cap` is None)."""
    if cap is None:
        return 1.0
    largest = ops.max(scores)
    return ops.where(largest > cap, cap / ops.where(largest > cap, largest, 1.0), 1.0)


class GramInput:
    """The Gram matrix as the methods use it.

    Attributes:
        ops: the namespace of array functions to compute with.
        dtype: the compute dtype (float64 for float64 input, else float32).
        num_tasks: T, static.
        unit: M / 2**k with 2**k near the largest diagonal entry (an exact
            rescaling), so tolerances are relative; zero when M is zero.
        scale: the power of two 2**k (1 when M is zero).
        active: bool (T,), tasks whose gradient is not exactly zero.
        finite: bool scalar, whether M is finite (non-finite input gives NaN
            weights, which the model's finiteness checks catch).
        eps: machine epsilon of the compute dtype (a Python float).
    """

    def __init__(self, gram, ops=keras.ops):
        self.ops = ops
        gram = ops.stop_gradient(ops.convert_to_tensor(gram))  # weights are constants
        dtype = nx.float_dtype(gram)
        self.dtype = dtype if dtype in ("float32", "float64") else "float32"
        gram = ops.cast(gram, self.dtype)
        num_tasks = gram.shape[-1]
        if len(gram.shape) != 2 or num_tasks is None or gram.shape[0] != num_tasks:
            raise ValueError(f"gram must have a static (T, T) shape, got {gram.shape}")
        self.num_tasks = num_tasks
        self.eps = nx.eps(self.dtype)
        self.finite = ops.all(ops.isfinite(gram))
        gram = ops.where(self.finite, gram, ops.eye(num_tasks, dtype=self.dtype))
        largest = ops.max(ops.diagonal(gram))
        largest = ops.where(largest > 0, largest, 1.0)
        self.scale = nx.power_of_two_near(largest, ops=ops)
        self.unit = gram / self.scale
        self.active = ops.diagonal(self.unit) > 0

    def const(self, value):
        return self.ops.convert_to_tensor(value, dtype=self.dtype)

    def norms(self):
        """sqrt(diag(unit)), with 1 for inactive tasks (safe divisors)."""
        ops = self.ops
        diag = ops.diagonal(self.unit)
        return ops.where(self.active, ops.sqrt(ops.where(self.active, diag, 1.0)), 1.0)

    def correlation(self):
        """C_ij = M_ij / (|g_i| |g_j|) between active tasks, identity rows and
        columns for inactive ones: the Gram matrix of the unit gradients."""
        ops = self.ops
        norms = self.norms()
        pair = self.active[:, None] & self.active[None, :]
        corr = self.unit / norms[:, None] / norms[None, :]
        return ops.where(pair, corr, ops.eye(self.num_tasks, dtype=self.dtype))

    def ridged_correlation(self, epsilon):
        """`correlation()` plus max(epsilon, eps) on the active tasks'
        diagonal: the regular system Nash-MTL's and FairGrad's Newton steps
        solve."""
        ridge = self.ops.where(self.active, self.const(max(epsilon, self.eps)), 0.0)
        return self.correlation() + nx.diagonal_matrix(ridge, ops=self.ops)

    def finish(self, weights):
        """NaN weights for non-finite input, in the input's compute dtype."""
        return self.ops.where(self.finite, weights, np.nan)


class GradientWeighting(Weighting):
    """Base of the Gram-matrix weightings: the `mode` and `head_update` options.

    Args:
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap, as MGDA-UB) or `"parameters"` (with
            respect to the shared weights, one backward per task).
        head_update: `"full"` (each task head gets its own plain gradient)
            or `"scaled"` (each head gets its task weight times its gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).
    """

    base_class = True  # not a method: left out of `by_name`

    requires_gram = True

    def __init__(
        self,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("mode", mode, GRADIENT_SPACES)
        check_choice("head_update", head_update, HEAD_UPDATES)
        self.mode = mode
        self.head_update = head_update

    @property
    def gradient_space(self):
        return self.mode

    def head_weights(self, weights, ops=keras.ops):
        if self.head_update == "full":
            return ops.ones_like(weights)
        return weights

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "head_update": self.head_update})
        return config
