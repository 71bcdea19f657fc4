"""The contract between a `MultiTaskModel` and its train step.

A `StepPlan` is built once per compilation, when the compiled loss is first
built: it says what the tasks are, where the model splits into an encoder
and heads, which heads run together, which state a bad step must leave
untouched, and which weighting balances the tasks. The backends' train
steps read the plan, never the model's private attributes.
"""

import dataclasses
from collections.abc import Iterable
from typing import Any

import keras

from keras_mgda import _keras
from keras_mgda import graph
from keras_mgda.step import losses as task_losses
from keras_mgda.step.trackers import Trackers
from keras_mgda.step.trackers import make_trackers
from keras_mgda.types import Tensor
from keras_mgda.weighting.base import Weighting

__all__ = ["Split", "StepPlan", "build_plan", "unique_variables"]


@dataclasses.dataclass(eq=False)
class Split:
    """Where the model splits at the shared representation Z.

    Attributes:
        encoder: functional model inputs -> Z, or None for a model with a
            single output (nothing to split: its one task trains as plain
            Keras).
        heads: functional model Z -> outputs, or None likewise.
        shared_tensor: the `KerasTensor` Z, or None.
    """

    encoder: keras.Model | None = None
    heads: keras.Model | None = None
    shared_tensor: keras.KerasTensor | None = None


@dataclasses.dataclass(eq=False)
class StepPlan:
    """What the train step needs to know about a compiled multi-task model.

    Attributes:
        task_names: the tasks (outputs compiled with a loss), in order.
        loss_weights: each task's `loss_weights` (1.0 where none was given).
        task_outputs: the flat index of the output each task's loss reads.
        outputs: the model's output tensors, flat.
        outputs_struct: the structure the model returns its outputs in.
        weighting: the `Weighting` that balances the tasks.
        split: the model's `Split` at Z.
        compile_loss: the `CompileLoss` this plan was built for (a
            recompiled model gets a new plan).
        recorded: where the per-task losses land during a loss computation.
        trackers: the task-weight, skipped-step and non-finite trackers.
        on_nonfinite: `"raise"` or `"skip"`.
        backend_state: what a backend prepares once for this plan and keeps
            (the torch tensors behind variables, TF's snapshot variables).
    """

    task_names: list[str]
    loss_weights: list[float]
    task_outputs: list[int]
    outputs: list[keras.KerasTensor]
    outputs_struct: Any
    weighting: Weighting
    split: Split
    compile_loss: Any
    recorded: dict[int, Tensor]
    trackers: Trackers
    on_nonfinite: str
    backend_state: Any = None
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def needs_gram(self) -> bool:
        """Whether the step computes per-task gradients and their Gram
        matrix. Never for one task: it has nothing to balance."""
        return self.num_tasks > 1 and self.weighting.requires_gram

    @property
    def aggregates(self) -> bool:
        """Whether the weighting acts on the per-task gradients themselves
        (`GradientAggregator`) rather than weighting them."""
        return self.needs_gram and getattr(self.weighting, "aggregates_gradients", False)

    @property
    def needs_losses_after_update(self) -> bool:
        """Whether the weighting learns from the losses after the update
        (`AfterUpdateHook`)."""
        return self.num_tasks > 1 and getattr(self.weighting, "needs_losses_after_update", False)

    @property
    def in_parameters(self) -> bool:
        """Whether the per-task gradients are taken with respect to the
        shared weights (exact MGDA) rather than Z."""
        return self.needs_gram and self.weighting.gradient_space == "parameters"

    @property
    def gradient_shapes(self) -> list:
        """The shapes of one task's gradient in the weighting's space, one
        per tensor an aggregator receives: the shared weights' shapes
        (parameters mode), or Z's with None for the batch axis (none for a
        model with a single output)."""
        if self.split.encoder is None:
            return []
        if self.weighting.gradient_space == "parameters":
            return [tuple(v.shape) for v in self.split.encoder.trainable_variables]
        return [tuple(self.split.shared_tensor.shape)]

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def output_heads(self) -> list[keras.Model]:
        """One functional model from Z to each output (built on first use:
        40 heads cost a noticeable part of the first step otherwise)."""
        split = self.split
        return self._cached(
            "output_heads", lambda: graph.output_heads(split.shared_tensor, self.outputs)
        )

    @property
    def head_groups(self) -> list[tuple[list[int], keras.Model]]:
        """`graph.head_groups`: outputs whose heads share a layer, together."""
        return self._cached(
            "head_groups",
            lambda: graph.head_groups(self.output_heads, self.split.shared_tensor, self.outputs),
        )

    @property
    def separable(self) -> bool:
        """Whether every output feeds exactly one task and the heads share no
        layer with each other or with the encoder: then one backward of the
        summed losses, each head reading its own copy of Z, gives every
        dL_t/dZ and every head's own gradient at once."""
        return self._cached("separable", self._is_separable)

    def _is_separable(self):
        if sorted(self.task_outputs) != list(range(len(self.outputs))):
            return False
        if len(self.head_groups) != len(self.outputs):
            return False
        encoder_ids = {id(v) for v in self.split.encoder.trainable_variables}
        return not any(
            id(v) in encoder_ids for head in self.output_heads for v in head.trainable_variables
        )

    def record_variable_ids(self) -> set[int]:
        """Ids of the variables that record skipped and non-finite steps: a
        skipped step must still update them, so they are never rolled back."""
        trackers = (self.trackers.skipped, self.trackers.nonfinite)
        return {id(v) for tracker in trackers for v in tracker.variables}

    def protected(self, model: keras.Model) -> list[keras.Variable]:
        """The state a bad step must leave untouched besides the trainable
        weights and the optimizer (which change only in the apply phase):
        BatchNorm statistics and similar non-trainable state, the
        weighting's state, and every metric, but the step records."""
        def collect():
            excluded = self.record_variable_ids()
            variables = list(model.non_trainable_variables) + list(model.metrics_variables)
            return [v for v in unique_variables(variables) if id(v) not in excluded]

        return self._cached("protected", collect)

    def task_losses(self, dtype: str) -> list[Tensor]:
        """The per-task losses of the last loss computation (see
        `losses.task_loss_list`)."""
        return task_losses.task_loss_list(self.recorded, self.loss_weights, dtype)


def unique_variables(variables: Iterable[keras.Variable]) -> list[keras.Variable]:
    """`variables` without repeats, in order of first appearance."""
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def _task_outputs(model, entries):
    """For each task, the flat index of the output its loss reads."""
    structure = _keras.outputs_struct(model)
    count = len(keras.tree.flatten(structure))
    indices = keras.tree.pack_sequence_as(structure, list(range(count)))
    result = []
    for entry in entries:
        index = indices
        try:
            for key in entry.path:
                index = index[key]
        except (KeyError, IndexError, TypeError):
            index = model.output_names.index(entry.path[-1])
        result.append(index if isinstance(index, int) else 0)
    return result


def build_plan(model: keras.Model, split: Split, weighting: Weighting, on_nonfinite: str) -> StepPlan:
    """The plan for the model's current compilation.

    Args:
        model: the `MultiTaskModel`, with its compiled loss built.
        split: its `Split` at Z.
        weighting: its `Weighting`.
        on_nonfinite: `"raise"` or `"skip"`.

    Returns:
        A `StepPlan`.
    """
    compile_loss = _keras.compile_loss(model)
    recorded = {}
    names, loss_weights = task_losses.record_task_losses(compile_loss, recorded)
    structure = _keras.outputs_struct(model)
    return StepPlan(
        task_names=names,
        loss_weights=loss_weights,
        task_outputs=_task_outputs(model, _keras.flat_losses(compile_loss)),
        outputs=keras.tree.flatten(structure),
        outputs_struct=structure,
        weighting=weighting,
        split=split,
        compile_loss=compile_loss,
        recorded=recorded,
        # A raising step's wrapper reads a flag after every step anyway:
        # reading the task weights there too adds no wait.
        trackers=make_trackers(names, split_after_step=on_nonfinite == "raise"),
        on_nonfinite=on_nonfinite,
    )
