"""The paper's baselines beyond a weighting: a grid search over static
weights on the simplex, and single-task models with the same trunk."""

import itertools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import keras

from keras_mgda.weighting.static import Static

__all__ = [
    "grid_search",
    "simplex_grid",
    "single_task_model",
    "single_task_models",
]


def simplex_grid(num_tasks: int, steps: int) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex whose entries are multiples of
    1/steps.

    Args:
        num_tasks: int, the number of tasks T.
        steps: int, the grid resolution (steps=4 gives 0, .25, .5, .75, 1).

    Returns:
        A list of tuples of T floats that sum to 1 (C(steps+T-1, T-1) of
        them), vertices first.

    Example:

    ```python
    keras_mgda.simplex_grid(2, 4)
    # [(1.0, 0.0), (0.0, 1.0), (0.75, 0.25), (0.25, 0.75), (0.5, 0.5)]
    ```
    """
    if num_tasks < 1 or steps < 1:
        raise ValueError(
            f"simplex_grid needs num_tasks >= 1 and steps >= 1; got "
            f"num_tasks={num_tasks}, steps={steps}."
        )
    points = []
    for counts in itertools.product(range(steps + 1), repeat=num_tasks):
        if sum(counts) == steps:
            points.append(tuple(c / steps for c in counts))
    # Vertices (single-task weightings) first, then by decreasing max weight.
    points.sort(key=lambda p: (-max(p), [-c for c in p]))
    return points


def grid_search(
    build_model: Callable[[Static | None], keras.Model],
    compile_kwargs: Mapping[str, Any] | Callable[[], dict[str, Any]],
    x: Any = None,
    y: Any = None,
    *,
    num_tasks: int | None = None,
    steps: int = 4,
    grid: Iterable[Sequence[float] | dict[str, float]] | None = None,
    validation_data: Any = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Trains one model per static weight vector and reports each.

    The paper's "grid search" baseline: a `MultiTaskModel` with
    `keras_mgda.weighting.Static(w)` for every w on a simplex grid (or the
    grid you pass), each built fresh, compiled the same way and fitted on the
    same data.

    Args:
        build_model: a function `weighting -> MultiTaskModel` (uncompiled)
            that builds a fresh model each call, e.g.
            `lambda w: keras_mgda.models.multi_mnist_lenet(weighting=w)`.
        compile_kwargs: dict passed to `model.compile` (a fresh optimizer is
            made from it for each model: pass the optimizer by name or
            config, not an instance, or pass a function returning the dict).
        x: training inputs, as for `fit`.
        y: training targets, as for `fit`.
        num_tasks: the number of tasks; by default the number of the
            model's outputs.
        steps: the grid resolution (see `simplex_grid`).
        grid: optional list of weight vectors (lists in task order or dicts
            keyed by output name) instead of the simplex grid.
        validation_data: as for `fit`; each model is also evaluated on it.
        **fit_kwargs: passed to `fit` (epochs, batch_size, callbacks, ...).

    Returns:
        A list of dicts, one per weight vector, in grid order: `"weights"`,
        `"history"` (the History's dict) and `"evaluation"` (the
        `evaluate(validation_data)` dict, or None).

    Example:

    ```python
    results = keras_mgda.grid_search(
        lambda w: keras_mgda.models.multi_mnist_lenet(weighting=w),
        dict(optimizer="sgd", loss=..., metrics=...),
        train_ds, steps=4, validation_data=test_ds, epochs=10)
    best = min(results, key=lambda r: r["evaluation"]["loss"])
    ```
    """
    if grid is None:
        if num_tasks is None:
            probe = build_model(None)
            num_tasks = len(probe.outputs)
        grid = simplex_grid(num_tasks, steps)
    results = []
    for weights in grid:
        weights = dict(weights) if isinstance(weights, dict) else list(weights)
        model = build_model(Static(weights))
        options = compile_kwargs() if callable(compile_kwargs) else dict(compile_kwargs)
        optimizer = options.get("optimizer")
        if isinstance(optimizer, keras.optimizers.Optimizer):
            # One optimizer instance cannot train several models.
            options["optimizer"] = optimizer.__class__.from_config(optimizer.get_config())
        model.compile(**options)
        history = model.fit(x, y, validation_data=validation_data, **fit_kwargs)
        evaluation = None
        if validation_data is not None:
            evaluation = _evaluate(model, validation_data)
        results.append(
            {"weights": weights, "history": history.history, "evaluation": evaluation}
        )
    return results


def _evaluate(model, validation_data):
    if isinstance(validation_data, tuple):
        return model.evaluate(*validation_data, verbose=0, return_dict=True)
    return model.evaluate(validation_data, verbose=0, return_dict=True)


def single_task_model(model: keras.Model, task: str) -> keras.Model:
    """A fresh model with the same trunk and only `task`'s head.

    The paper's "single task" baseline: the same architecture with one
    output, newly initialised, trained with plain Keras `fit`.

    Args:
        model: a functional multi-output model (e.g. a `MultiTaskModel`).
        task: the name of the output to keep.

    Returns:
        An uncompiled `keras.Model` with fresh weights and the single output
        `{task: ...}`.

    Example:

    ```python
    left_only = keras_mgda.single_task_model(model, "left")
    left_only.compile("sgd", loss={"left": "sparse_categorical_crossentropy"})
    ```
    """
    names = list(model.output_names)
    if task not in names:
        raise ValueError(f"The model has no output {task!r}; its outputs are {names}.")
    output = model.outputs[names.index(task)]
    template = keras.Model(model.inputs, output)
    clone = keras.models.clone_model(template)
    return keras.Model(clone.inputs, {task: clone.outputs[0]}, name=f"{task}_single_task")


def single_task_models(model: keras.Model) -> dict[str, keras.Model]:
    """`single_task_model` for every output of `model`.

    Args:
        model: a functional multi-output model.

    Returns:
        A dict {output name: fresh uncompiled single-output model}.

    Example:

    ```python
    for task, single in keras_mgda.single_task_models(model).items():
        single.compile("adam", loss={task: losses[task]})
    ```
    """
    return {name: single_task_model(model, name) for name in model.output_names}
