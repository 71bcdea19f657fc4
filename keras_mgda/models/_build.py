"""Wrapping a functional graph into the right multi-task model class."""

from typing import Any

from keras_mgda import weighting as weighting_lib
from keras_mgda.model import MGDAModel
from keras_mgda.model import MultiTaskModel
from keras_mgda.types import WeightingLike

__all__ = [
    "multi_task_model",
]


def multi_task_model(
    inputs: Any, outputs: Any, weighting: WeightingLike = None, name: str | None = None, **model_kwargs: Any
) -> MultiTaskModel:
    """An `MGDAModel` (weighting None or an MGDA instance, MGDA options in
    `model_kwargs`) or a `MultiTaskModel` with the given weighting."""
    if weighting is None:
        return MGDAModel(inputs, outputs, name=name, **model_kwargs)
    weighting = weighting_lib.get(weighting)
    if isinstance(weighting, weighting_lib.MGDA):
        return MGDAModel(inputs, outputs, weighting=weighting, name=name, **model_kwargs)
    return MultiTaskModel(inputs, outputs, weighting=weighting, name=name, **model_kwargs)
