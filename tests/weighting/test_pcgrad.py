"""PCGrad (Yu et al. 2020): each task gradient projected, in a random task
order shared by all tasks, onto the normal plane of every other gradient it
conflicts with; the weights are the coefficients of the task gradients in
the sum of the projected gradients.

Checked: the shared properties (_asserts.py; not task-order invariance:
the order is random); the surgery against Algorithm 1 on explicit vectors
(`references.pcgrad_surgery`), also on the degenerate problems in float32
and float64; and torchjd's PCGrad under a fixed task order.
"""

import itertools

import numpy as np
import pytest
from keras import ops
from references import pcgrad_surgery

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting import pcgrad
from keras_mgda.weighting.pcgrad import PCGrad

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import first_order
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._problems import CASES
from ._problems import DEGENERATE
from ._problems import DEGENERATE_NAMES
from ._problems import TASKS
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = PCGrad  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled", "seed": 7}


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(PCGrad, OPTIONS)
    asserts.assert_gradient_options(PCGrad, default_head_update="full")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(PCGrad)


def test_head_weights():
    asserts.assert_head_weights(PCGrad)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    """(`make` resets the seed: every call draws the same order.)"""
    asserts.assert_scale_invariant(make(PCGrad), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(PCGrad), num_tasks, engine, zero_weight=1.0)
    asserts.assert_nan_for_non_finite_gram(make(PCGrad), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(PCGrad), [[4.0]], engine=engine), [1.0], rtol=1e-5)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    """tf.function(jit_compile=True): XLA draws other random orders, so the
    weights are the surgery for one of the orders."""
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    g = gradients("random", 3, 4)
    compiled = weigh(make(PCGrad), gram_of(g), xla=True)
    errors = [np.abs(g.T @ compiled - pcgrad_surgery(g, p)).max() for p in itertools.permutations(range(3))]
    assert min(errors) <= 1e-5 * np.abs(g).max()


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    """The torch step runs a weighting it does not solve on the host with
    direct torch calls (`ops=torch_ops`): the same weights as keras.ops
    (fresh instances with the same seed draw the same order)."""
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(
        lambda: PCGrad(seed=3), torch_ops, ("aligned", "random", "mixed", "low_rank"), (1, 2, 3, 10, 40)
    )


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_is_the_surgery(num_tasks, seed, engine):
    g = gradients("random", num_tasks, seed)
    weights = weigh(make(PCGrad), gram_of(g), engine=engine).astype(np.float64)
    order = first_order(5, num_tasks)
    assert sorted(order) == list(range(num_tasks))
    expected = pcgrad_surgery(g, order)
    error = np.linalg.norm(g.T @ weights - expected) / np.linalg.norm(np.abs(g).sum(0))
    measure("pcgrad_vs_surgery", error)
    assert error <= 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_two_conflicting_tasks(seed, engine):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((2, 4))
    if g[0] @ g[1] > 0:
        g[1] = -g[1]
    g = g.astype(np.float32).astype(np.float64)
    weights = weigh(make(PCGrad), gram_of(g), engine=engine).astype(np.float64)
    d = g.T @ weights
    # Hand-computed: each gradient loses its component along the other.
    expected = (g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]) + (g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0])
    np.testing.assert_allclose(d, expected, atol=1e-5 * np.abs(g).max())
    # Neither projected gradient conflicts with the other task: the sum
    # improves both tasks (to first order).
    assert np.all(g @ d >= -1e-5 * np.linalg.norm(g, axis=1) * np.linalg.norm(d))


@pytest.mark.parametrize("num_tasks", TASKS)
def test_without_conflicts_sums_the_gradients(num_tasks, engine):
    g = np.abs(gradients("aligned", num_tasks, 0))  # pairwise dot products > 0
    np.testing.assert_array_equal(weigh(make(PCGrad), gram_of(g), engine=engine), np.ones(num_tasks))


def test_order_is_random_and_seeded(engine):
    gram = gram_of(gradients("random", 10, 3))
    first = make(PCGrad)
    draws = [weigh(first, gram, engine=engine) for _ in range(4)]
    assert len({d.tobytes() for d in draws}) > 1  # a new order every step
    np.testing.assert_array_equal(weigh(make(PCGrad), gram, engine=engine), draws[0])  # same seed, same orders
    direct = np.asarray(ops.convert_to_numpy(pcgrad.surgery(gram.astype(np.float32), first_order(5, 10))))
    np.testing.assert_allclose(draws[0], direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_surgery_on_degenerate_problems(dtype):
    """The surgery on the exact degenerate problems (rank-deficient,
    badly scaled, duplicated and opposite gradients), through NumPy in
    float32 and float64: the update is Algorithm 1's to rounding."""
    eps = float(np.finfo(dtype).eps)
    for name in DEGENERATE_NAMES:
        problem = DEGENERATE[name]
        order = np.random.default_rng(problem.num_tasks).permutation(problem.num_tasks).astype(np.int32)
        weights = pcgrad.surgery(problem.gram.astype(dtype), order, ops=numpy_ops)
        assert weights.dtype == np.dtype(dtype)
        d = problem.g.T @ weights.astype(np.float64)
        expected = pcgrad_surgery(problem.g, order)
        scale = np.abs(weights.astype(np.float64)) @ np.linalg.norm(problem.g, axis=1)
        error = np.linalg.norm(d - expected) / scale
        measure(f"pcgrad_degenerate_{dtype}", error)
        assert error <= 1e3 * eps, (name, error)


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed, monkeypatch):
    """torchjd's PCGrad weights on the same Gramian under a fixed task order.
    torchjd draws a new order per task (torch.randperm inside its loop); ours
    is one order per step from the weighting's seed. With torch.randperm
    returning the order of PCGrad(seed=5)'s first step, both compute the
    same surgery."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    order = first_order(5, num_tasks)
    fixed = torch.from_numpy(order.astype(np.int64))
    monkeypatch.setattr(torch, "randperm", lambda n, *args, **kwargs: fixed.clone())
    expected = aggregation.PCGradWeighting()(torch.from_numpy(gram)).numpy()
    monkeypatch.undo()
    exact = pcgrad.surgery(gram, order, ops=numpy_ops)  # float64
    error64 = np.abs(exact - expected).max() / np.abs(expected).max()
    measure("pcgrad_vs_torchjd_float64", error64)
    assert error64 <= 1e-12
    weights = weigh(make(PCGrad), gram.astype(np.float32))  # the first step: that order
    error32 = np.abs(weights - expected).max() / np.abs(expected).max()
    measure("pcgrad_vs_torchjd_float32", error32)
    assert error32 <= 1e-5
