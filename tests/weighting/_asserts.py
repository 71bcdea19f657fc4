"""Property assertions shared by the weighting tests (as torchjd's
tests/unit/aggregation/_asserts.py): each checks one thing a weighting
promises, on the problem it is given, and returns what it measured where
that is a number worth reporting. The per-method modules call them on that
method's problems."""

import keras
import numpy as np
from keras import ops

from keras_mgda import weighting as weighting_lib

from ._calling import BACKEND
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of

__all__ = [
    "assert_bounded",
    "assert_compiled_equals_plain",
    "assert_config_round_trip",
    "assert_finite_on_degenerate_grams",
    "assert_float64_paths_agree",
    "assert_gradient_options",
    "assert_head_weights",
    "assert_invalid_options_raise",
    "assert_namespaces_agree",
    "assert_nan_for_non_finite_gram",
    "assert_no_conflict",
    "assert_permutation_equivariant",
    "assert_scale_invariant",
    "degenerate_grams",
]


# ------------------------------------------------------------- interface


def assert_config_round_trip(cls, options):
    """`get_config` holds every option; `from_config`, Keras serialisation
    and `keras_mgda.weighting.get` rebuild an equal weighting, for the
    defaults and for `options`; `repr` names the class."""
    for given in ({}, options):
        weighting = cls(**given)
        config = weighting.get_config()
        for name, value in given.items():
            assert config[name] == value, name
        clone = cls.from_config(config)
        assert type(clone) is cls and clone.get_config() == config
        restored = weighting_lib.get(keras.saving.serialize_keras_object(weighting))
        assert type(restored) is cls and restored.get_config() == config
        assert repr(weighting).startswith(cls.__name__ + "(")


def assert_gradient_options(cls, default_head_update):
    """A Gram-matrix weighting: it asks for the Gram matrix, works on the
    representation by default (on the shared weights with
    mode="parameters"), and its heads' default update is the documented one."""
    assert cls.requires_gram
    default = cls()
    assert default.gradient_space == "representation" and default.mode == "representation"
    assert cls(mode="parameters").gradient_space == "parameters"
    assert default.head_update == default_head_update


def assert_invalid_options_raise(cls):
    """An unknown `mode` or `head_update` raises a ValueError naming the
    valid choices."""
    import pytest

    with pytest.raises(ValueError, match="representation"):
        cls(mode="shared")
    with pytest.raises(ValueError, match="full"):
        cls(head_update="half")


def assert_head_weights(cls, scaled=None, rtol=0.0):
    """Heads get weight 1 with head_update="full"; with "scaled" they get
    `scaled` (default: the task weights themselves, bit for bit)."""
    weights = np.array([0.5, 2.0, 3.0], np.float32)
    expected = weights if scaled is None else scaled
    for head_update in ("full", "scaled"):
        head = cls(head_update=head_update).head_weights(ops.convert_to_tensor(weights))
        out = np.asarray(ops.convert_to_numpy(head))
        if head_update == "full":
            np.testing.assert_array_equal(out, [1.0, 1.0, 1.0])
        elif rtol:
            np.testing.assert_allclose(out, expected, rtol=rtol)
        else:
            np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------ invariances


def assert_permutation_equivariant(weighting, gram, losses, perm, engine):
    """Reordering the tasks (rows and columns of M, and the losses) reorders
    the weights alike (to float32 rounding)."""
    weights = weigh(weighting, gram, losses, engine=engine)
    permuted = weigh(weighting, gram[np.ix_(perm, perm)], losses[perm], engine=engine)
    np.testing.assert_allclose(permuted, weights[perm], rtol=1e-4, atol=1e-5 * np.abs(weights).max())


def assert_scale_invariant(weighting, gram, engine, exponent=0.0):
    """Scaling M by s scales the weights by s**exponent: bit for bit under
    powers of two when exponent is 0 (the methods rescale M by a power of
    two), to float32 rounding otherwise (s from 2^-60 to 1e30)."""
    base = weigh(weighting, gram, engine=engine)
    for factor in (2.0**-60, 2.0**60, 1e-20, 3.0, 1e30):
        weights = weigh(weighting, gram * factor, engine=engine)  # same seed: same order
        if exponent:
            np.testing.assert_allclose(weights / factor**exponent, base, rtol=1e-5)
        elif np.log2(factor) == np.round(np.log2(factor)):
            np.testing.assert_array_equal(weights, base)
        else:
            np.testing.assert_allclose(weights, base, rtol=1e-4, atol=1e-5 * np.abs(base).max())


# --------------------------------------------------------- degenerate input


def degenerate_grams(num_tasks):
    """Zero, huge (1e30), rank-deficient, duplicated-gradient and mixed-scale
    (norms e^-20 to e^20) Gram matrices of T tasks."""
    rng = np.random.default_rng(num_tasks)
    g = gradients("random", num_tasks, 9)
    duplicated = g.copy()
    duplicated[num_tasks // 2 :] = g[0]
    return {
        "zero": np.zeros((num_tasks, num_tasks)),
        "huge": gram_of(g) / np.abs(gram_of(g)).max() * 1e30,
        "rank_deficient": gram_of(gradients("low_rank", num_tasks, 9)),
        "duplicated": gram_of(duplicated),
        "mixed_scales": gram_of(g * np.exp(rng.uniform(-20, 20, size=(num_tasks, 1)))),
    }


def assert_finite_on_degenerate_grams(weighting, num_tasks, engine, zero_weight):
    """Finite weights on every Gram matrix of `degenerate_grams`, and
    `zero_weight` for every task when M is zero."""
    grams = degenerate_grams(num_tasks)
    for name, gram in grams.items():
        weights = weigh(weighting, gram, engine=engine)
        assert np.all(np.isfinite(weights)), name
    np.testing.assert_allclose(weigh(weighting, grams["zero"], engine=engine), zero_weight, rtol=1e-6)


def assert_nan_for_non_finite_gram(weighting, num_tasks, engine):
    """A NaN or infinite entry in M gives NaN weights for every task (which
    the model's finiteness check catches), and no error."""
    for bad in (np.nan, np.inf):
        gram = gram_of(gradients("random", num_tasks, 9))
        gram[0, -1] = gram[-1, 0] = bad
        assert np.all(np.isnan(weigh(weighting, gram, engine=engine))), bad


def assert_bounded(weights, gram, bound):
    """Finite weights, each no larger than `bound` in units of the task's
    own scale: max_k |w_k| |g_k| <= bound * max_k |g_k| (for tasks of equal
    norms: max |w| <= bound). Returns that ratio."""
    weights = np.asarray(weights, np.float64)
    assert np.all(np.isfinite(weights)), weights
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    ratio = np.max(np.abs(weights) * norms) / np.max(norms) if np.max(norms) > 0 else np.abs(weights).max()
    assert ratio <= bound, (ratio, weights)
    return ratio


def assert_no_conflict(gram, weights, tol):
    """The update d = sum_k w_k g_k conflicts with no task to first order:
    g_i . d = (M w)_i >= -tol (|M| |w|)_i (tol relative to the rounding
    scale of each entry). Returns the worst relative conflict (>= 0)."""
    gram = np.asarray(gram, np.float64)
    weights = np.asarray(weights, np.float64)
    scale = np.abs(gram) @ np.abs(weights)
    relative = np.where(scale > 0, gram @ weights / np.where(scale > 0, scale, 1.0), 0.0)
    conflict = max(-float(np.min(relative)), 0.0)
    assert conflict <= tol, (conflict, weights)
    return conflict


# -------------------------------------------------------- paths, compiling


def assert_namespaces_agree(factory, namespace, families, sizes, rtol=1e-5):
    """A fresh `factory()` weighs alike through keras.ops and through the
    array `namespace` (e.g. `torch_ops`): same weights to float32 rounding,
    on every family of `gradients` and every T in `sizes`."""
    for family in families:
        for num_tasks in sizes:
            gram = gram_of(gradients(family, num_tasks, seed=0))
            losses = np.linspace(0.5, 2.0, num_tasks).astype(np.float32)
            results = []
            for space in (ops, namespace):
                weighting = factory()
                weighting.build(num_tasks, [f"t{i}" for i in range(num_tasks)])
                results.append(weigh(weighting, gram, losses, namespace=space))
            expected, got = results
            np.testing.assert_allclose(
                got,
                expected,
                rtol=rtol,
                atol=1e-6 * np.abs(expected).max(),
                err_msg=f"{type(factory()).__name__} {family} T={num_tasks}",
            )


def assert_float64_paths_agree(weighting, gram, rtol=1e-12):
    """In float64, keras.ops (eagerly) and NumPy (`numpy_ops`) give the same
    weights to float64 rounding: the methods compute in the input's dtype.
    Returns the relative difference."""
    from keras_mgda.backend import numpy_ops

    gram = np.asarray(gram, np.float64)
    losses = np.ones(len(gram))
    with np.errstate(all="ignore"):
        expected = weighting(losses, gram, ops=numpy_ops)
    got = weighting(ops.convert_to_tensor(losses, "float64"), ops.convert_to_tensor(gram, "float64"))
    got = np.asarray(ops.convert_to_numpy(got))
    assert got.dtype == np.float64 and expected.dtype == np.float64
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= rtol, error
    return error


def assert_compiled_equals_plain(weighting, gram):
    """On TensorFlow, tf.function(jit_compile=True) (XLA) gives the weights of
    tf.function to float32 rounding. (On JAX every `weigh` runs under
    jax.jit already; on torch there is nothing to compile.)"""
    assert BACKEND == "tensorflow"
    compiled = weigh(weighting, gram, xla=True)
    plain = weigh(weighting, gram)
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())
