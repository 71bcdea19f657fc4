"""Every weighting, compiled as the model's step compiles it on the active
backend (jax.jit, tf.function), gives the weights of the NumPy host path
where the method has one, else those of the same weighting run eagerly,
and finite weights on degenerate Gram matrices.

The rest of this folder checks the methods' mathematics once, under torch
(`one_backend`); this module is what runs on every backend, so that a
method that traces wrongly, or a keras.ops function that means something
else on one backend, still fails here. Each method runs with its defaults
and with the options its own module tests (mode, head_update and the
method's parameters), on T = 1 and 3 (the T = 1 shortcuts and the general
path; the solvers' sizes are tested in test_solvers.py).
"""

import contextlib

import numpy as np
import pytest
from keras import ops

import keras_mgda as km
from keras_mgda.backend import numpy_ops

from ._aggregating import aggregate
from ._asserts import degenerate_grams
from ._calling import BACKEND
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of

pytestmark = pytest.mark.all_backends

# The option sets of each method's own module (OPTIONS there), beside the
# defaults: together they trace every mode and option branch.
OPTIONS = {
    "AlignedMTL": [{"scale_mode": "median", "mode": "parameters", "head_update": "scaled"}],
    "CAGrad": [{"c": 0.25, "rescale": 2}],
    "ConFIG": [{"preferences": [1.0, 2.0, 0.5]}],
    "CRMOGM": [],
    "DBMTL": [],
    "DualProj": [{"max_rounds": 30, "preferences": [1.0, 2.0]}],
    "FairGrad": [{"alpha": 2.0, "max_iters": 30, "epsilon": 1e-8}],
    "GradNorm": [],
    "GradVac": [{"beta": 0.1, "seed": 7}],
    "IMTL": [],
    "IMTLG": [],
    "MGDA": [{"normalization": "l2"}, {"normalization": "loss"}, {"normalization": "none", "max_iters": 5}],
    "NashMTL": [{"max_norm": 2.0, "max_iters": 20, "epsilon": 1e-5}, {"update_weights_every": 3}],
    "PCGrad": [{"seed": 7}],
    "SDMGrad": [{"lambda_": 0.6}],
    "UPGrad": [{"max_rounds": 30}],
}
AGGREGATORS = {
    "GradDrop": [{"seed": 7, "leak": [0.0, 0.5, 1.0]}],
    "MoCo": [{"beta": 0.5, "gamma": 0.2, "beta_decay": 0.5, "gamma_decay": 0.5, "rho": 0.1}],
    "ExcessMTL": [{"robust_step_size": 0.5}],
}
SIZES = (1, 3)
# The per-task gradient shapes the aggregators are given (a kernel, a bias).
GRADIENT_SHAPES = [(4, 3), (5,)]


def _cases(table):
    for name, variants in table.items():
        for options in [{}, *variants]:
            label = ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            yield pytest.param(name, options, id=f"{name}[{label}]")


def _fresh(name, options, num_tasks):
    """A built instance, and a function that puts its state back to the
    start (so that the compiled and the eager call see the same state)."""
    if "preferences" in options or "leak" in options:
        key = "preferences" if "preferences" in options else "leak"
        options = dict(options, **{key: (options[key] * num_tasks)[:num_tasks]})
    weighting = getattr(km.weighting, name)(**options)
    if getattr(weighting, "needs_gradient_shapes", False):
        weighting.set_gradient_shapes(GRADIENT_SHAPES)
    weighting.build(num_tasks, [f"t{i}" for i in range(num_tasks)])
    start = [ops.convert_to_numpy(v.value) for v in weighting.variables]

    def reset():
        for variable, value in zip(weighting.variables, start, strict=True):
            variable.assign(value)

    return weighting, reset


@contextlib.contextmanager
def _eagerly():
    """Runs keras.ops op by op: jax.disable_jit on JAX (TensorFlow and
    torch run eagerly outside tf.function already)."""
    if BACKEND == "jax":
        import jax

        with jax.disable_jit():
            yield
    else:
        yield


def _eager(weighting, gram, losses):
    with _eagerly():
        weights = weighting(ops.convert_to_tensor(losses), ops.convert_to_tensor(np.asarray(gram, np.float32)))
    return np.asarray(ops.convert_to_numpy(weights))


def _problems(num_tasks):
    rng = np.random.default_rng(num_tasks)
    losses = rng.uniform(0.2, 3.0, num_tasks).astype(np.float32)
    return losses, [gram_of(gradients(family, num_tasks, 3)) for family in ("random", "aligned")]


def _close(got, expected, what):
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * max(1.0, np.abs(expected).max()), err_msg=what)


@pytest.mark.parametrize("name, options", list(_cases(OPTIONS)))
def test_compiled_weights_equal_the_reference(name, options):
    for num_tasks in SIZES:
        weighting, reset = _fresh(name, options, num_tasks)
        losses, grams = _problems(num_tasks)
        for index, gram in enumerate(grams):
            reset()
            compiled = weigh(weighting, gram, losses)
            reset()
            expected = _reference(weighting, gram, losses, first=index == 0)
            if expected is not None:
                _close(compiled, expected, f"{name} {options} T={num_tasks} problem {index}")
        for label, gram in degenerate_grams(num_tasks).items():
            reset()
            assert np.all(np.isfinite(weigh(weighting, gram, losses))), f"{name} {options} T={num_tasks} {label}"


def _reference(weighting, gram, losses, first):
    """The NumPy host path's weights where the method has one, else the
    eager ones (on JAX for the `first` problem only: op-by-op JAX takes
    seconds per solver loop); None where there is no reference."""
    gram = np.asarray(gram, np.float32)
    if weighting.solvable_on_host:
        with np.errstate(all="ignore"):
            return weighting(losses, gram, ops=numpy_ops)
    if BACKEND == "jax" and not first:
        return None
    return _eager(weighting, gram, losses)


@pytest.mark.parametrize("name, options", list(_cases(AGGREGATORS)))
def test_compiled_aggregation_equals_the_eager_one(name, options):
    for num_tasks in SIZES:
        aggregator, reset = _fresh(name, options, num_tasks)
        rng = np.random.default_rng(num_tasks)
        grads = [rng.normal(size=(num_tasks, *shape)).astype(np.float32) for shape in GRADIENT_SHAPES]
        losses = rng.uniform(0.2, 3.0, num_tasks).astype(np.float32)
        reset()
        directions, weights = aggregate(aggregator, grads, losses)
        reset()
        with _eagerly():
            eager_directions, eager_weights = _eager_aggregate(aggregator, grads, losses)
        what = f"{name} {options} T={num_tasks}"
        _close(weights, eager_weights, what)
        for got, expected in zip(directions, eager_directions, strict=True):
            _close(got, expected, what)


def _eager_aggregate(aggregator, grads, losses):
    from ._aggregating import gram_of_gradients

    tensors = [ops.convert_to_tensor(g) for g in grads]
    gram = ops.convert_to_tensor(gram_of_gradients(grads))
    directions, weights = aggregator.aggregate(tensors, ops.convert_to_tensor(losses), gram)
    return [np.asarray(ops.convert_to_numpy(d)) for d in directions], np.asarray(ops.convert_to_numpy(weights))


def test_every_gram_method_is_listed():
    """A new Gram-matrix method must be added above, or it runs on torch only."""
    listed = set(OPTIONS) | set(AGGREGATORS)
    gram_methods = {cls.__name__ for cls in km.weighting.by_name().values() if cls.requires_gram}
    assert gram_methods == listed, gram_methods ^ listed
