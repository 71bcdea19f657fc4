"""IMTL (Liu et al., ICLR 2021): impartial multi-task learning, IMTL-L's
learned loss scales and IMTL-G's impartial gradient on the scaled losses."""

from typing import Literal

import keras

from keras_mgda import numerics as nx
from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting.imtl import impartial_weights
from keras_mgda.weighting.imtl_l import add_log_scales
from keras_mgda.weighting.imtl_l import scale_objective

__all__ = [
    "IMTL",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class IMTL(GradientWeighting):
    """Impartial multi-task learning: IMTL-L and IMTL-G together (the
    paper's hybrid "IMTL").

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021, Algorithm 1. Each task loss is scaled
    by a learned e^{s_t} (IMTL-L: the scales minimise
    sum_t (e^{s_t} L_t - s_t), learned by the model's optimizer, see
    `IMTLL`); the shared update is IMTL-G's impartial combination of the
    scaled losses' gradients e^{s_t} g_t (see `IMTLG`); each task head
    follows the gradient of its own scaled loss.

    On this interface: the scaled gradients' Gram matrix is D M D with
    D = diag(e^s), IMTL-G's weights on it are alpha (summing to 1), and
    the weight of the raw loss L_t is w_t = alpha_t e^{s_t}, so that
    sum_t w_t g_t = sum_t alpha_t (e^{s_t} g_t). Since IMTL-G's direction
    depends only on the unit gradients, the scales change the length of
    the shared update (through the normalisation sum alpha = 1) and the
    heads' updates, not its direction. This is also LibMTL's `IMTL`, which
    applies IMTL-G to the gradients of e^{s} L - s.

    Args:
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap, the paper's suggestion for speed) or
            `"parameters"` (with respect to the shared weights).
        head_update: `"full"` (each head follows its scaled loss: e^{s_t}
            times its own gradient, the paper) or `"scaled"` (each head
            gets w_t times its gradient).
        initial_log_scale: the starting s_t (0, the paper's and LibMTL's).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights alpha_t e^{s_t} of the raw losses.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.IMTL())
    ```
    """

    def __init__(
        self,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        initial_log_scale: float = 0.0,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.initial_log_scale = float(initial_log_scale)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.log_scales = add_log_scales(self, num_tasks, self.initial_log_scale)

    def _scales(self, ops, dtype="float32"):
        return ops.stop_gradient(ops.exp(ops.cast(ops.convert_to_tensor(self.log_scales), dtype)))

    def call(self, losses, gram=None, ops=keras.ops):
        gram = ops.convert_to_tensor(gram)
        dtype = "float64" if nx.float_dtype(gram) == "float64" else "float32"
        scales = self._scales(ops, dtype)
        scaled = GramInput(ops.cast(gram, dtype) * scales[:, None] * scales[None, :], ops)
        return scaled.finish(impartial_weights(scaled) * scales)

    def head_weights(self, weights, ops=keras.ops):
        if self.head_update == "scaled":
            return weights
        return ops.cast(self._scales(ops), weights.dtype)

    def loss(self, losses, gram=None):
        return scale_objective(self.log_scales, losses)

    def get_config(self):
        config = super().get_config()
        config["initial_log_scale"] = self.initial_log_scale
        return config
