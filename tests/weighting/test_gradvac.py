"""GradVac (Wang et al., ICLR 2021): each g_i^PC visits the other tasks in
a random order and is corrected towards the EMA goal phi_hat_ij of its
cosine with g_j; the weights are the coefficients of sum_i g_i^PC.

Checked: the interface and options; the method against Algorithm 1 on
explicit vectors (a NumPy reference, sequential in i and j) over several
steps with the goals carried as state; the first step with goals 0 is a
projection (PCGrad's); scale invariance, degenerate and non-finite input
(the goals untouched); seeded orders; and torchjd's GradVac under the same
orders (torch.randperm patched) over several steps.
"""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting import gradvac
from keras_mgda.weighting.gradvac import GradVac

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = GradVac  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled", "beta": 0.1, "seed": 7}
SEED = 5
_CACHE = {}


def fresh(num_tasks, beta=0.5):
    """A built GradVac(seed=SEED) for T tasks, its goals and draws reset to
    the first step (one instance per T, so compiled once)."""
    key = (num_tasks, beta)
    if key not in _CACHE:
        weighting = GradVac(beta=beta, seed=SEED)
        weighting.build(num_tasks)
        _CACHE[key] = (weighting, [ops.convert_to_numpy(v.value) for v in weighting.variables])
    weighting, initial = _CACHE[key]
    for variable, value in zip(weighting.variables, initial, strict=True):
        variable.assign(value)
    return weighting


def orders_of(num_tasks, steps):
    """The orders of the first `steps` steps of a fresh GradVac(seed=SEED)."""
    generator = keras.random.SeedGenerator(SEED)
    return [np.asarray(ops.convert_to_numpy(gradvac.random_orders(num_tasks, generator))) for _ in range(steps)]


def reference(g, goals, orders, beta):
    """Algorithm 1 on explicit float64 vectors, task after task."""
    num_tasks = len(g)
    goals, corrected = goals.copy(), g.copy()
    norms = np.linalg.norm(g, axis=1)
    for i in range(num_tasks):
        for j in orders[i]:
            size = np.linalg.norm(corrected[i])
            phi = corrected[i] @ g[j] / (size * norms[j]) if size * norms[j] > 0 else 0.0
            goal = goals[i, j]
            root = np.sqrt(max(1.0 - goal * goal, 0.0))
            if phi < goal and norms[j] * root > 0:
                step = size * (goal * np.sqrt(max(1.0 - phi * phi, 0.0)) - phi * root) / (norms[j] * root)
                corrected[i] = corrected[i] + step * g[j]
            goals[i, j] = (1.0 - beta) * goal + beta * phi
    return corrected.sum(axis=0), goals


def goals_of(weighting):
    return np.asarray(ops.convert_to_numpy(weighting.goals.value), np.float64)


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(GradVac, OPTIONS)
    asserts.assert_gradient_options(GradVac, default_head_update="full")
    assert GradVac().beta == 0.5


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(GradVac)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            GradVac(beta=bad)


def test_head_weights():
    asserts.assert_head_weights(GradVac)


def test_orders_are_permutations_of_the_others():
    for num_tasks in (2, 3, 10):
        for order in orders_of(num_tasks, 3):
            assert order.shape == (num_tasks, num_tasks - 1)
            for i, row in enumerate(order):
                assert sorted(row) == [j for j in range(num_tasks) if j != i]


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("family", ["random", "aligned", "mixed", "low_rank"])
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_is_algorithm_one_over_steps(family, num_tasks, engine):
    """Three steps on different gradients, the goals carried: the update
    and the goals of every step are Algorithm 1's (to float32 rounding:
    the cosines of corrected gradients come from the Gram matrix, where
    norms 1e-4 to 1e4 (mixed) cost ~1e-4 through cancellation; and in the
    collinear low-rank case (T = 3, D = 1) a corrected gradient is zero up
    to rounding, whose cosine is then +-1 rather than 0: the goals differ
    and so do later steps, so low_rank is compared on its first step)."""
    weighting = fresh(num_tasks)
    goals = np.zeros((num_tasks, num_tasks))
    for step, order in enumerate(orders_of(num_tasks, 1 if family == "low_rank" else 3)):
        g = gradients(family, num_tasks, step)
        weights = weigh(weighting, gram_of(g), engine=engine).astype(np.float64)
        expected, goals = reference(g, goals, order, 0.5)
        scale = np.abs(weights) @ np.linalg.norm(g, axis=1)
        error = np.linalg.norm(g.T @ weights - expected) / scale
        measure(f"gradvac_vs_algorithm_{family}", error)
        assert error <= 1e-5, (step, error)
        if family != "low_rank":
            np.testing.assert_allclose(goals_of(weighting), goals, atol=1e-3 if family == "mixed" else 1e-5)


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_first_step_projects_conflicts_away(num_tasks, engine):
    """With the goals at 0, a conflicting pair is corrected to
    orthogonality: each g_i^PC ends with g_i^PC . g_j >= 0 for the last j
    it visited, and without conflicts every weight is 1."""
    g = np.abs(gradients("aligned", num_tasks, 0))
    np.testing.assert_array_equal(weigh(fresh(num_tasks), gram_of(g), engine=engine), np.ones(num_tasks))
    if num_tasks == 2:
        g = np.array([[1.0, 0.0], [-1.0, 1.0]])
        weights = weigh(fresh(2), gram_of(g), engine=engine)
        expected = (g[0] + 0.5 * g[1]) + (g[1] + g[0])  # each projected on the other's normal plane
        np.testing.assert_allclose(g.T @ weights, expected, rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    """Same state and draws: scaling M by s changes nothing (bit for bit
    for powers of two)."""
    gram = gram_of(gradients("random", num_tasks, 8))
    base = weigh(fresh(num_tasks), gram, engine=engine)
    for factor in (2.0**-60, 2.0**60, 3.0, 1e-20, 1e30):
        weights = weigh(fresh(num_tasks), gram * factor, engine=engine)
        if np.log2(factor) == np.round(np.log2(factor)):
            np.testing.assert_array_equal(weights, base)
        else:
            np.testing.assert_allclose(weights, base, rtol=1e-4, atol=1e-5 * np.abs(base).max())


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_and_non_finite_grams(num_tasks, engine):
    """Finite weights on the degenerate Gram matrices (all 1 for M = 0);
    NaN weights for a non-finite M, which leaves the goals untouched."""
    for name, gram in asserts.degenerate_grams(num_tasks).items():
        weights = weigh(fresh(num_tasks), gram, engine=engine)
        assert np.all(np.isfinite(weights)), name
        if name == "zero":
            np.testing.assert_array_equal(weights, np.ones(num_tasks))
    weighting = fresh(num_tasks)
    weigh(weighting, gram_of(gradients("random", num_tasks, 1)), engine=engine)
    goals = goals_of(weighting)
    bad = gram_of(gradients("random", num_tasks, 9))
    bad[0, -1] = bad[-1, 0] = np.nan
    assert np.all(np.isnan(weigh(weighting, bad, engine=engine)))
    np.testing.assert_array_equal(goals_of(weighting), goals)


def test_seeded_orders_are_reproducible(engine):
    gram = gram_of(gradients("random", 10, 3))
    first = [weigh(fresh(10), gram, engine=engine) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    weighting = fresh(10)
    draws = [weigh(weighting, gram, engine=engine) for _ in range(3)]
    assert len({d.tobytes() for d in draws}) > 1  # new orders and goals every step


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    """tf.function(jit_compile=True): XLA draws other orders, so the update
    is Algorithm 1's for one of them."""
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    g = gradients("random", 3, 4)
    weights = weigh(fresh(3), gram_of(g), xla=True).astype(np.float64)
    rows = [list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)]
    errors = [
        np.abs(g.T @ weights - reference(g, np.zeros((3, 3)), order, 0.5)[0]).max()
        for order in itertools.product(*rows)
    ]
    assert min(errors) <= 1e-5 * np.abs(g).max()


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    from keras_mgda.backend import torch_ops

    for num_tasks in (1, 2, 3, 10, 40):
        gram = gram_of(gradients("random", num_tasks, 0))
        expected = weigh(fresh(num_tasks), gram)
        got = weigh(fresh(num_tasks), gram, namespace=torch_ops)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_vaccine_in_float64():
    """The coefficient form in float64 (NumPy) is Algorithm 1 to rounding."""
    g = well_conditioned(6, 2)
    (order,) = orders_of(6, 1)
    goals = np.random.default_rng(0).uniform(-0.3, 0.6, (6, 6))
    weights, new_goals = gradvac.vaccine(g @ g.T, goals, order, 0.3, ops=numpy_ops)
    expected, expected_goals = reference(g, goals, order, 0.3)
    np.testing.assert_allclose(g.T @ weights, expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(new_goals, expected_goals, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed, monkeypatch):
    """torchjd's GradVac weights over three steps (its goals carried in the
    same stateful object) under our orders: torch.randperm, which it calls
    once per task i for the order of the others, returns our draws. eps=0
    (torchjd's absolute 1e-8 in the denominators moves these weights by
    ~1e-8; ours divides safely instead)."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    orders = orders_of(num_tasks, 3)
    theirs = aggregation.GradVacWeighting(beta=0.5, eps=0.0)
    weighting = fresh(num_tasks)
    goals = np.zeros((num_tasks, num_tasks))
    for step, order in enumerate(orders):
        g = well_conditioned(num_tasks, 10 * seed + step)
        gram = g @ g.T
        perms = iter([
            torch.tensor([[j for j in range(num_tasks) if j != i].index(k) for k in order[i]])
            for i in range(num_tasks)
        ])
        monkeypatch.setattr(torch, "randperm", lambda n, *args, perms=perms, **kwargs: next(perms))
        expected = theirs(torch.from_numpy(gram)).numpy()
        monkeypatch.undo()
        exact, goals = gradvac.vaccine(gram, goals, order, 0.5, ops=numpy_ops)
        error64 = np.abs(exact - expected).max() / np.abs(expected).max()
        measure("gradvac_vs_torchjd_float64", error64)
        assert error64 <= 1e-12, (step, error64)
        weights = weigh(weighting, gram.astype(np.float32))
        error32 = np.abs(weights - expected).max() / np.abs(expected).max()
        measure("gradvac_vs_torchjd_float32", error32)
        assert error32 <= 1e-5, (step, error32)


def test_growth_cap_after_aligned_gradients():
    """Thirty steps of aligned gradients bring the goals to 1 - 1e-7; then
    orthogonal gradients: uncapped, each corrected gradient is ~1000 times
    longer than its own gradient; capped, 10 times, in the same direction
    (the goals move alike)."""
    aligned = np.array([[1.0, 0.0], [1.0, 1e-3]])
    orthogonal = np.eye(2)
    results = []
    for cap in (None, 10.0):
        weighting = GradVac(seed=0, growth_cap=cap)
        weighting.build(2)
        for _ in range(30):
            weigh(weighting, gram_of(aligned))
        results.append((weigh(weighting, gram_of(orthogonal)), np.array(ops.convert_to_numpy(weighting.goals))))
    (raw, raw_goals), (capped, capped_goals) = results
    assert raw.max() > 500
    np.testing.assert_allclose(capped, raw / raw.max() * capped.max(), rtol=1e-5)
    # Uncapped g_i^PC = g_i + c g_j (orthonormal g, weights 1 + c), scaled
    # down to length 10: weights 10 (1 + c) / sqrt(1 + c^2).
    c = raw - 1.0
    np.testing.assert_allclose(capped, 10 * (1 + c) / np.sqrt(1 + c**2), rtol=1e-4)
    np.testing.assert_array_equal(capped_goals, raw_goals)
