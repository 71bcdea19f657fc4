"""The weighting interface: per-task losses (and, when asked for, the Gram
matrix of the per-task gradients) in, one weight per task out.

Almost every loss-balancing method is a function of the T x T Gram matrix
M = G G^T and the losses. The model computes M only for weightings that set
`requires_gram`, then backpropagates sum_t w_t dL_t/dZ through the encoder
once, so every method inherits the one-backward train step.

A weighting is a small Keras layer that the model tracks, so methods with
state (running losses, a seed for random task orders) or learned parameters
(Uncertainty's log-variances, GradNorm's weights) keep it in Keras variables:
they are saved in `.keras` files, carried through JAX's stateless step,
mirrored under tf.distribute and left untouched by a skipped step.
"""

import functools
import inspect

import keras

from keras_mgda import _keras
from keras_mgda.types import WeightingLike

__all__ = ["GRADIENT_SPACES", "Weighting", "by_name", "call_with_ops", "get", "per_task_values"]

GRADIENT_SPACES = ("representation", "parameters")


@functools.cache
def _accepts_ops(function):
    try:
        return "ops" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def call_with_ops(method, *args, ops=None):
    """Calls a weighting's `call` or `head_weights` with the array namespace
    `ops` when the method takes one (see `Weighting`), else without.

    Args:
        method: a bound method.
        *args: its positional arguments.
        ops: None (Keras's own ops) or a namespace like `keras.ops`.

    Returns:
        What the method returns.
    """
    if ops is not None and _accepts_ops(getattr(method, "__func__", method)):
        return method(*args, ops=ops)
    return method(*args)


class Weighting(keras.layers.Layer):
    """Base class of the task weightings.

    Subclasses implement `call(losses, gram)` and set `requires_gram` when
    they need the Gram matrix of the per-task gradients. A `call` (and a
    `head_weights`) that also takes an `ops` argument computes with that
    namespace of array functions instead of `keras.ops`: the eager torch
    step then passes direct torch calls, or NumPy (see `host_solvable`).
    Optional hooks:

    - `build(num_tasks)` creates the method's variables once the number of
      tasks is known (the model calls it when it reads the compiled losses).
      Non-trainable variables may be assigned in `call` (state such as
      running losses); use `add_state` to create them.
    - `loss(losses, gram)` is the method's own objective for its trainable
      variables (e.g. Uncertainty's log-variances), minimised by the model's
      optimizer beside the model. The losses and the Gram matrix it receives
      are constants: the model's weights never get gradients from it.
    - `head_weights(weights)` says how much of its own gradient each task's
      head receives.
    - `on_epoch_end(epoch, logs)` runs after each epoch of `fit` (outside
      the compiled step), for methods that work per epoch (DWA).

    The weights returned by `call` are treated as constants in the update:
    the model follows sum_t w_t dL_t.

    Attributes:
        requires_gram: whether `call` reads the Gram matrix.
        gradient_space: `"representation"` (gradients with respect to the
            shared representation Z, MGDA-UB) or `"parameters"` (with respect
            to the shared weights).
        host_solvable: whether the eager torch step may run `call` on the
            host, on NumPy arrays (`keras_mgda.backend.numpy_ops` passed as
            `ops`), where its small loops cost a fraction of as many torch
            calls. It applies only when `call` takes `ops` and the weighting
            has no variables (no state, no random draws): a subclass
            inherits it, and one whose `call` computes with `keras.ops`
            directly (no `ops` argument) runs on torch tensors.
        num_tasks: the number of tasks, once built.

    Example:

    ```python
    class Halves(Weighting):
        def call(self, losses, gram=None):
            return keras.ops.full_like(losses, 0.5)
    ```
    """

    requires_gram = False
    gradient_space = "representation"
    host_solvable = False
    base_class = True  # not a method: left out of `by_name`

    def __init__(self, **kwargs):
        # Weights, Gram matrices and state stay float32 under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_tasks = None
        self.task_names = None
        self._weighting_initialized = True

    def build(self, num_tasks, task_names=None):
        """Creates the method's state for `num_tasks` tasks.

        Args:
            num_tasks: int, the number of tasks.
            task_names: optional list of the tasks' names (the model's
                outputs), for options given per task name.
        """
        self.num_tasks = int(num_tasks)
        self.task_names = None if task_names is None else list(task_names)

    def __call__(self, losses, gram=None, *, ops=None):
        """Returns the task weights.

        Args:
            losses: float32 tensor (T,), the per-task (weighted) losses, as
                constants.
            gram: float32 tensor (T, T), the Gram matrix of the per-task
                gradients, or None when `requires_gram` is False.
            ops: optional namespace of array functions, passed on to a
                `call` that takes one (None: `keras.ops`).

        Returns:
            float32 tensor (T,): the weight of each task's loss in the
            shared (encoder) update.
        """
        # Not Layer.__call__: no autocasting, no symbolic build; the model
        # builds the weighting with the number of tasks.
        return call_with_ops(self.call, losses, gram, ops=ops)

    @property
    def solvable_on_host(self):
        """Whether the eager torch step solves this weighting with NumPy
        (see `host_solvable`)."""
        return (
            bool(self.host_solvable)
            and _accepts_ops(type(self).call)
            and not self.variables
        )

    def call(self, losses, gram=None):
        raise NotImplementedError

    def loss(self, losses, gram=None):
        """The method's own objective for its trainable variables, or None.

        Args:
            losses: float32 tensor (T,), constants.
            gram: float32 tensor (T, T) or None, constants.

        Returns:
            A float32 scalar, or None when the method learns nothing.
        """
        return None

    def head_weights(self, weights):
        """The coefficient of each task's loss in its head's update.

        Args:
            weights: the output of `__call__`.

        Returns:
            (T,) coefficients; by default the same weights.
        """
        return weights

    def on_epoch_end(self, epoch, logs=None):
        """Runs after each epoch of `fit`, outside the compiled train step.

        Args:
            epoch: int, the epoch that ended.
            logs: dict of the epoch's logs.
        """

    @property
    def has_epoch_hook(self):
        return type(self).on_epoch_end is not Weighting.on_epoch_end

    def add_state(self, name, shape=(), initializer="zeros", dtype="float32"):
        """A non-trainable variable that `call` may assign.

        Every replica computes the same value from the global losses, so the
        first replica's value is kept under tf.distribute.

        Args:
            name: the variable's name.
            shape: its shape.
            initializer: a Keras initializer or its name.
            dtype: its dtype.

        Returns:
            A `keras.Variable`.
        """
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=initializer,
            dtype=dtype,
            trainable=False,
            aggregation="only_first_replica",
        )

    def _saved_variables(self):
        # Seed generators' states too: a random method (PCGrad) resumes its
        # sequence of draws after loading instead of restarting it.
        return _keras.layer_own_state(self)

    def save_own_variables(self, store):
        for index, variable in enumerate(self._saved_variables()):
            store[f"{index}"] = variable

    def load_own_variables(self, store):
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"The saved state of weighting {self.name!r} has "
                f"{len(store.keys())} variables but {type(self).__name__} "
                f"built for {self.num_tasks} tasks has {len(variables)}: "
                "the file was saved with another method or version."
            )
        for index, variable in enumerate(variables):
            variable.assign(store[f"{index}"])

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_build_config(self):
        if self.num_tasks is None:
            return None
        return {"num_tasks": self.num_tasks, "task_names": self.task_names}

    def build_from_config(self, config):
        self.build(config["num_tasks"], config.get("task_names"))

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"


def get(identifier: WeightingLike):
    """Returns a `Weighting` from an instance, a name, a config dict or None.

    Args:
        identifier: a `Weighting`; a method's name as `by_name` lists it
            (`"mgda"`, `"pcgrad"`, ...; case, `-` and `_` are ignored, so
            `"Nash_MTL"` works), built with its defaults; a dict from
            `keras.saving.serialize_keras_object`; or None (MGDA).

    Returns:
        A `Weighting` instance.

    Example:

    ```python
    weighting = keras_mgda.weighting.get("upgrad")
    ```
    """
    if identifier is None:
        identifier = "mgda"
    if isinstance(identifier, str):
        identifier = _from_name(identifier)
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if not isinstance(identifier, Weighting):
        raise TypeError(
            "`weighting` must be a keras_mgda.weighting.Weighting instance "
            "such as keras_mgda.weighting.MGDA(), or a method's name such as "
            f"'mgda'; received {identifier!r}."
        )
    if not identifier.__dict__.get("_weighting_initialized", False):
        raise TypeError(
            f"{type(identifier).__name__}.__init__ must call "
            "super().__init__(**kwargs): a Weighting is a Keras layer."
        )
    return identifier


# Names that are not a class name (LibMTL's and torchjd's among them).
_ALIASES = {
    "mgdaub": "mgda",
    "ew": "uniform",
    "uw": "uncertainty",
    "geometricmean": "gls",
    "random": "rlw",
    "si": "scaleinvariant",
    "conflictfree": "config",
}


def _from_name(name):
    """A weighting built with its defaults from its registry name."""
    key = name.lower().replace("_", "").replace("-", "")
    key = _ALIASES.get(key, key)
    classes = by_name()
    if key not in classes:
        raise ValueError(
            f"Unknown weighting {name!r}; known names: {', '.join(sorted(classes))}."
        )
    try:
        return classes[key]()
    except TypeError as error:
        raise ValueError(
            f"The weighting {name!r} has required arguments ({error}); build "
            f"it yourself, e.g. keras_mgda.weighting.{classes[key].__name__}(...)."
        ) from error


def by_name():
    """Every public weighting class of `keras_mgda.weighting`, keyed by its
    lowercase class name (for command-line flags and benchmarks).

    Returns:
        A dict {"mgda": MGDA, "uniform": Uniform, ...}.

    Example:

    ```python
    weighting = keras_mgda.weighting.by_name()["pcgrad"]()
    ```
    """
    from keras_mgda import weighting as package

    return {
        name.lower(): value
        for name, value in vars(package).items()
        if isinstance(value, type)
        and issubclass(value, Weighting)
        and not vars(value).get("base_class", False)
        and not name.startswith("_")
    }


def per_task_values(values, num_tasks, task_names, what):
    """Resolves a per-task option (a list in task order, or a dict keyed by
    task name) to a list of `num_tasks` values.

    Args:
        values: a list/tuple of `num_tasks` values or a dict {task name: value}
            naming every task.
        num_tasks: int.
        task_names: the tasks' names in order, or None.
        what: the option's name, for error messages.

    Returns:
        A list of `num_tasks` values.
    """
    if isinstance(values, dict):
        if task_names is None:
            raise ValueError(
                f"`{what}` is a dict but the task names are unknown; pass a "
                f"list of {num_tasks} values in task order instead."
            )
        missing = [name for name in task_names if name not in values]
        unknown = [name for name in values if name not in task_names]
        if missing or unknown:
            raise ValueError(
                f"`{what}` must name every task exactly: the tasks are "
                f"{list(task_names)}; missing {missing}, unknown {unknown}."
            )
        return [values[name] for name in task_names]
    values = list(values)
    if len(values) != num_tasks:
        raise ValueError(
            f"`{what}` has {len(values)} values but the model has "
            f"{num_tasks} tasks"
            + (f" ({list(task_names)})" if task_names else "")
            + ": give one value per task, in task order, or a dict keyed by "
            "task name."
        )
    return values
