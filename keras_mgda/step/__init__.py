"""The multi-task train step, written once.

- `plan.py`: the `StepPlan`, what the step knows about a compiled model.
- `phases.py`: the phases every backend shares (losses, Gram matrix, task
  weights, gradients, the finiteness decision, metrics and logs).
- `losses.py`: the per-task losses, read from Keras's compiled loss.
- `trackers.py`: the task-weight, skipped-step and non-finite trackers.

The backends (`keras_mgda/backend/`) fill in what differs: how to
differentiate, how a compiled step applies or skips, how replicas agree.
"""

from keras_mgda.step import phases
from keras_mgda.step.plan import Split
from keras_mgda.step.plan import StepPlan
from keras_mgda.step.plan import build_plan

__all__ = ["Split", "StepPlan", "build_plan", "phases"]
