"""IMTL-L (Liu et al., ICLR 2021): the loss half of impartial multi-task
learning, learned loss scales."""

import keras
from keras import ops

from keras_mgda.weighting.base import Weighting

__all__ = [
    "IMTLL",
    "add_log_scales",
    "scale_objective",
]


@keras.saving.register_keras_serializable(package="keras_mgda")
class IMTLL(Weighting):
    """Impartial multi-task learning, loss balance (IMTL-L).

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021. Each task t has a learned log-scale
    s_t; the objective is sum_t (e^{s_t} L_t - s_t), so the weight of task
    t is w_t = e^{s_t}, and the model's optimizer learns s_t beside the
    model (d/ds_t = e^{s_t} L_t - 1: at the stationary point every scaled
    loss e^{s_t} L_t equals 1, whatever the tasks' scales). It is
    Uncertainty weighting (`Uncertainty`) with s = -log(sigma^2), up to
    a factor 2. The scales start at 0 (w = 1, the plain sum of the losses),
    as in the paper and LibMTL. Needs no gradients beyond the usual
    backward pass. For IMTL-L combined with IMTL-G, the paper's full
    method, see `IMTL`.

    Args:
        initial_log_scale: the starting s_t (0: every weight starts at 1).
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights e^{s_t}.

    Example:

    ```python
    model = keras_mgda.MultiTaskModel(
        inputs, outputs, weighting=keras_mgda.weighting.IMTLL())
    ```
    """

    def __init__(self, initial_log_scale: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_log_scale = float(initial_log_scale)

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self.log_scales = add_log_scales(self, num_tasks, self.initial_log_scale)

    def call(self, losses, gram=None):
        return ops.exp(ops.convert_to_tensor(self.log_scales))

    def loss(self, losses, gram=None):
        return scale_objective(self.log_scales, losses)

    def get_config(self):
        return {"initial_log_scale": self.initial_log_scale}


def add_log_scales(layer, num_tasks, initial):
    """The trainable (T,) log-scales s of IMTL-L on `layer`."""
    return layer.add_weight(
        name="log_scales",
        shape=(num_tasks,),
        initializer=keras.initializers.Constant(initial),
        dtype="float32",
        trainable=True,
    )


def scale_objective(log_scales, losses):
    """IMTL-L's objective for its scales, sum_t (e^{s_t} L_t - s_t), with
    the losses as constants.

    Args:
        log_scales: the (T,) variable s.
        losses: (T,) task losses.

    Returns:
        A float32 scalar.
    """
    scales = ops.convert_to_tensor(log_scales)
    losses = ops.stop_gradient(ops.cast(losses, "float32"))
    return ops.sum(ops.exp(scales) * losses - scales)
