"""What the aggregators with state shaped like the per-task gradients share
(MoCo's gradient estimates, ExcessMTL's sums of squared gradients): knowing
the gradients' shapes when they build, and the scale of the gradients they
get.

Keras variables need their shapes before the first (compiled) step, and a
weighting's `build(num_tasks)` is not told the gradients' shapes. The
model therefore calls `set_gradient_shapes(shapes)` before `build`,
outside the compiled step, with the shapes of one task's gradients in the
weighting's space (`MultiTaskModel._build_weighting`), and `build` creates
all the state at once. The shapes are kept in the build config, so a
loaded model makes the same variables before their values are read back.
"""

import keras

from keras_mgda import numerics as nx

__all__ = ["GradientState", "gradient_scale", "normalise_shapes"]


def normalise_shapes(shapes):
    """A tuple of shape tuples (None for unknown sizes)."""
    return tuple(tuple(None if d is None else int(d) for d in shape) for shape in shapes)


class GradientState:
    """Mixin of a `GradientAggregator` whose state has the shape of the
    per-task gradients.

    Subclasses implement `build_gradient_state(shapes)` (creating the
    variables with `add_state`; `build` calls it once the shapes are set)
    and call `check_gradients` in `aggregate`.

    Attributes:
        needs_gradient_shapes: True: the model must call
            `set_gradient_shapes` before `build`.
        gradient_shapes: the shapes it is built for, or None.
    """

    needs_gradient_shapes = True
    gradient_shapes = None

    def set_gradient_shapes(self, shapes):
        """Sets the shapes of one task's gradients, before `build`.

        Args:
            shapes: one shape per tensor `aggregate` receives, in that
                order, without the task axis: in parameters mode the shared
                weights' shapes (the encoder's trainable variables); in
                representation mode Z's shape with None for the batch axis.

        Raises:
            ValueError: once built, for other shapes than it was built for.
        """
        shapes = normalise_shapes(shapes)
        if self.built:
            if self.gradient_shapes is None:
                raise ValueError(
                    f"{type(self).__name__} was built without the gradients' shapes, so it "
                    "has no state for them: give the model an unbuilt instance."
                )
            if self.gradient_shapes != shapes:
                raise ValueError(
                    f"{type(self).__name__} was built for gradients of shapes "
                    f"{_listed(self.gradient_shapes)}, not {_listed(shapes)}: give the "
                    "model a new weighting instance."
                )
            return
        self.gradient_shapes = shapes

    def build(self, num_tasks, task_names=None):
        super().build(num_tasks, task_names)
        if self.gradient_shapes is not None:
            self.build_gradient_state(self.gradient_shapes)

    def build_gradient_state(self, shapes):
        raise NotImplementedError

    def check_gradients(self, gradients):
        """Raises a clear error when the state is missing or the gradients
        do not match it (static sizes only)."""
        name = type(self).__name__
        if self.gradient_shapes is None or not self.built:
            raise RuntimeError(
                f"{name} keeps state shaped like the per-task gradients, which "
                "MultiTaskModel creates before the first step. Used on its own, "
                f"call `set_gradient_shapes(shapes)` and then `build(num_tasks)`."
            )
        given = normalise_shapes([g.shape[1:] for g in gradients])
        ok = len(given) == len(self.gradient_shapes) and all(
            len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))
            for a, b in zip(given, self.gradient_shapes)
        )
        if not ok:
            raise ValueError(
                f"{name} was built for gradients of shapes {_listed(self.gradient_shapes)} "
                f"but receives {_listed(given)}."
            )

    def get_build_config(self):
        config = super().get_build_config()
        if config is not None and self.gradient_shapes is not None:
            config["gradient_shapes"] = [list(shape) for shape in self.gradient_shapes]
        return config

    def build_from_config(self, config):
        if config.get("gradient_shapes") is not None:
            self.set_gradient_shapes(config["gradient_shapes"])
        super().build_from_config(config)


def _listed(shapes):
    return [list(shape) for shape in shapes]


def gradient_scale(gradients, gram, *, ops=keras.ops):
    """The factor s by which the per-task gradients an aggregator receives
    exceed the gradients of the losses: the loss scale under mixed precision
    (the step divides it out of the Gram matrix only), else 1.

    Estimated as sqrt(sum ||G||^2 / trace(M)) and rounded to the nearest
    power of two when within 1e-3 of it (Keras's loss scales are powers of
    two, so s is then exact); 1 when every gradient is zero or a value is
    not finite (the step then skips or raises anyway).

    Args:
        gradients: list of (T, ...) tensors.
        gram: (T, T) float32 Gram matrix of the unscaled gradients.
        ops: the namespace of array functions.

    Returns:
        A float32 scalar.
    """
    total = None
    for g in gradients:
        part = ops.sum(ops.square(ops.cast(g, "float32")))
        total = part if total is None else total + part
    trace = ops.sum(ops.diagonal(ops.cast(gram, "float32")))
    ok = (trace > 0) & (total > 0) & ops.isfinite(trace) & ops.isfinite(total)
    ratio = ops.sqrt(ops.where(ok, total, 1.0) / ops.where(ok, trace, 1.0))
    nearest = nx.power_of_two_near(ratio, ops=ops)
    ratio = ops.where(ops.abs(ratio / nearest - 1.0) < 1e-3, nearest, ratio)
    return ops.where(ok, ratio, 1.0)
