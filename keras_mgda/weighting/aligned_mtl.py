"""Aligned-MTL (Senushkin et al., CVPR 2023): independent component
alignment, from the eigendecomposition of the Gram matrix."""

from typing import Literal

import keras
import numpy as np

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._gradient_base import check_choice

__all__ = ["AlignedMTL", "balance_transformation"]

SCALE_MODES = ("min", "median", "rmse")


@keras.saving.register_keras_serializable(package="keras_mgda")
class AlignedMTL(GradientWeighting):
    """Aligned multi-task learning: a stable, balanced system of gradients.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023 (Algorithm 1). With the
    eigendecomposition M = V diag(lambda) V^T of the Gram matrix, restricted
    to its numerical rank R (eigenvalues above max(lambda) T eps), the
    balance transformation

        B = sqrt(lambda_R) V diag(lambda^-1/2) V^T

    turns the task gradients G into G_hat = B G, whose Gram matrix
    B M B = lambda_R V V^T has a single eigenvalue: for linearly independent
    gradients the balanced gradients are orthogonal and all have norm
    sqrt(lambda_R), the smallest singular value of G (`scale_mode="min"`,
    the paper's choice). The shared weights follow the sum of the balanced
    gradients, sum_t (B G)_t = sum_k (B 1)_k g_k, as in the authors' code:
    the weights are B 1. They do not change when M is scaled, and zero
    gradients (rank 0) give weights 1.

    Task heads keep their plain gradients (`head_update="full"`), as the
    authors' code does by default (`scale_decoder_grad=False`).

    Args:
        scale_mode: the common singular value of the balanced gradients:
            `"min"` (the smallest, lambda_R, as in the paper), `"median"`
            (the lower median of the kept eigenvalues) or `"rmse"` (their
            mean), as in the authors' code.
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap, the paper's Aligned-MTL-UB) or
            `"parameters"` (with respect to the shared weights).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights B 1. For orthogonal gradients of
        equal norm they are all 1.

    Example:

    ```python
    weighting = keras_mgda.weighting.AlignedMTL()
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    # Not solved on the host: NumPy's eigendecomposition starts OpenBLAS
    # threads that then compete with torch's for the rest of the step
    # (measured: 1.44x plain Keras at T=40 against 1.09x on torch calls).
    host_solvable = False

    def __init__(
        self,
        scale_mode: Literal["min", "median", "rmse"] = "min",
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        check_choice("scale_mode", scale_mode, SCALE_MODES)
        self.scale_mode = scale_mode

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        balance = balance_transformation(gram.unit, self.scale_mode, ops=ops)
        return gram.finish(ops.sum(balance, axis=-1))

    def get_config(self):
        config = super().get_config()
        config["scale_mode"] = self.scale_mode
        return config


def balance_transformation(gram, scale_mode="min", *, ops=keras.ops):
    """Aligned-MTL's balance transformation B, so that B M B = s V_R V_R^T.

    Args:
        gram: (T, T) symmetric positive semi-definite Gram matrix M.
        scale_mode: `"min"`, `"median"` or `"rmse"` (see `AlignedMTL`).
        ops: the namespace of array functions (default `keras.ops`).

    Returns:
        (T, T) symmetric matrix B; the identity when M is zero.

    Example:

    ```python
    b = balance_transformation(gram)  # rows of b @ G: the balanced gradients
    ```
    """
    check_choice("scale_mode", scale_mode, SCALE_MODES)
    gram = ops.convert_to_tensor(gram)
    dtype = nx.float_dtype(gram)
    gram = ops.cast(gram, dtype)
    num_tasks = gram.shape[-1]
    eps = float(np.finfo(dtype).eps)
    values, vectors = ops.eigh(gram)
    tol = ops.max(values) * num_tasks * eps
    kept = values > tol
    rank = ops.sum(ops.cast(kept, "int32"))
    safe = ops.where(kept, values, 1.0)
    if scale_mode == "min":
        scale = ops.min(ops.where(kept, values, np.inf))
    elif scale_mode == "median":
        # Lower median of the kept (largest R) eigenvalues, as torch.median.
        ordered = ops.sort(ops.where(kept, values, -np.inf))
        index = num_tasks - rank + ops.floor_divide(rank - 1, 2)
        scale = ops.take(ordered, ops.clip(index, 0, num_tasks - 1))
    else:
        scale = ops.sum(ops.where(kept, values, 0.0)) / ops.cast(ops.maximum(rank, 1), dtype)
    scale = ops.where(rank > 0, scale, 1.0)
    inverse_roots = ops.where(kept, 1.0 / ops.sqrt(safe), 0.0)
    # einsum, not ops.matmul: Keras's torch matmul computes float64 in float32.
    balance = ops.sqrt(scale) * ops.einsum("ik,jk->ij", vectors * inverse_roots[None, :], vectors)
    return ops.where(rank > 0, balance, ops.eye(num_tasks, dtype=dtype))
