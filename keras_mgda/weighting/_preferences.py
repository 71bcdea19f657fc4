"""Per-task preference vectors of the weightings that take one (DualProj,
ConFIG): a list in task order or a dict keyed by task name, resolved once
the tasks are known."""

from keras_mgda.weighting.base import per_task_values

__all__ = ["check_preferences", "resolve_preferences"]


def check_preferences(preferences):
    """The option as stored in the config: None, a list of floats or a dict
    {task name: float}, every value finite and positive."""
    if preferences is None:
        return None
    values = preferences.values() if isinstance(preferences, dict) else preferences
    values = list(values)
    if not values or not all(float(v) > 0 and float(v) < float("inf") for v in values):
        raise ValueError(f"preferences must be finite and positive, one per task; got {preferences!r}.")
    if isinstance(preferences, dict):
        return {str(k): float(v) for k, v in preferences.items()}
    return [float(v) for v in values]


def resolve_preferences(preferences, num_tasks, task_names, default):
    """The preferences as a list of `num_tasks` floats (`default` each when
    None)."""
    if preferences is None:
        return [float(default)] * num_tasks
    return [float(v) for v in per_task_values(preferences, num_tasks, task_names, "preferences")]
