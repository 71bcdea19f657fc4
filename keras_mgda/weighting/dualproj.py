"""DualProj (Quinton & Rey, 2024, torchjd): the mean gradient projected onto
the dual cone of the task gradients."""

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Literal

import keras

from keras_mgda.weighting._gradient_base import GradientWeighting
from keras_mgda.weighting._gradient_base import GramInput
from keras_mgda.weighting._preferences import check_preferences
from keras_mgda.weighting._preferences import resolve_preferences
from keras_mgda.weighting.upgrad import project_onto_dual_cone

__all__ = ["DualProj"]


@keras.saving.register_keras_serializable(package="keras_mgda")
class DualProj(GradientWeighting):
    """Projection of the mean gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    2024 (arXiv:2406.16232; torchjd's `DualProj`), after the projection of
    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (Eq. 11). The average of the task gradients,
    sum_k u_k g_k with u_k = 1/T (or the given preferences), is replaced by
    its projection onto the dual cone {x : g_j . x >= 0 for all j}, which is
    sum_k w_k g_k with

        w = argmin_{w >= u} w^T M w

    (the paper's Proposition 1), solved exactly on the Gram matrix by the
    active-set method UPGrad uses (`project_onto_dual_cone`). The update
    then conflicts with no task: M w >= 0. Unlike UPGrad, which projects
    each task gradient and averages the projections, DualProj projects
    the average once.

    Without conflicts the weights are u (1/T each, torchjd's default mean
    preference). They do not change when M is scaled, and tasks whose
    gradient is exactly zero keep their preference with no effect. Task
    heads keep their plain gradients (`head_update="full"`), as in torchjd's
    `mtl_backward`.

    Args:
        preferences: None (1/T for every task), or one positive value per
            task (a list in task order or a dict keyed by output name): the
            vector u whose combination of the gradients is projected
            (torchjd's `pref_vector`).
        mode: `"representation"` (gradients with respect to the shared
            representation Z, cheap) or `"parameters"` (with respect to the
            shared weights, as in the paper).
        head_update: `"full"` (heads get their own gradients) or `"scaled"`
            (heads get their task weight times their gradient).
        max_rounds: cap on the active-set rounds; None for 2 T + 16.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`).

    Returns:
        From `call`: (T,) float32 weights w >= u.

    Example:

    ```python
    weighting = keras_mgda.weighting.DualProj()
    model = keras_mgda.MultiTaskModel(inputs, outputs, weighting=weighting)
    ```
    """

    host_solvable = True

    def __init__(
        self,
        preferences: Sequence[float] | Mapping[str, float] | None = None,
        mode: Literal["representation", "parameters"] = "representation",
        head_update: Literal["scaled", "full"] = "full",
        max_rounds: int | None = None,
        **kwargs,
    ):
        super().__init__(mode=mode, head_update=head_update, **kwargs)
        self.preferences = check_preferences(preferences)
        self.max_rounds = max_rounds
        self._resolved = None

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        self._resolved = resolve_preferences(self.preferences, num_tasks, task_names, 1.0 / num_tasks)

    def call(self, losses, gram=None, ops=keras.ops):
        gram = GramInput(gram, ops)
        num_tasks = gram.num_tasks
        resolved = self._resolved
        if resolved is None or len(resolved) != num_tasks:
            resolved = resolve_preferences(self.preferences, num_tasks, None, 1.0 / num_tasks)
        lower = ops.convert_to_tensor([resolved], dtype=gram.dtype)
        max_rounds = None if self.max_rounds is None else int(self.max_rounds)
        return gram.finish(project_onto_dual_cone(gram.unit, lower, max_rounds, ops=ops)[0])

    def get_config(self):
        config = super().get_config()
        config.update({"preferences": self.preferences, "max_rounds": self.max_rounds})
        return config
