"""Aligned-MTL (Senushkin et al. 2023): the balance transformation
B = sqrt(s) V diag(lambda^-1/2) V^T of M = V diag(lambda) V^T (its
numerical rank R: eigenvalues above max(lambda) T eps), so that the
balanced gradients B G are orthogonal with equal norms; the weights are
B 1.

Checked: the shared properties (_asserts.py); B M B = lambda_min I and the
weights against a float64 eigendecomposition (`references.aligned_weights`),
for the three scale modes and rank-deficient M; on the degenerate
problems, against the same reference in float32 and float64; and torchjd's
Aligned-MTL on random full-rank problems.
"""

import numpy as np
import pytest
from keras import ops
from references import aligned_weights

from keras_mgda.backend import numpy_ops
from keras_mgda.weighting import aligned_mtl
from keras_mgda.weighting.aligned_mtl import AlignedMTL

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import compiled_function
from ._calling import make
from ._calling import measure
from ._calling import weigh
from ._calling import weigh_in
from ._problems import CASES
from ._problems import DEGENERATE
from ._problems import exact_params
from ._problems import gradients
from ._problems import gram_of
from ._problems import well_conditioned

WEIGHTING = AlignedMTL  # conftest: the engines follow its solvable_on_host
OPTIONS = {"scale_mode": "median", "mode": "parameters", "head_update": "scaled"}


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(AlignedMTL, OPTIONS)
    asserts.assert_gradient_options(AlignedMTL, default_head_update="full")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(AlignedMTL)
    with pytest.raises(ValueError, match="min"):
        AlignedMTL(scale_mode="max")


def test_head_weights():
    asserts.assert_head_weights(AlignedMTL)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    perm = rng.permutation(num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks)
    asserts.assert_permutation_equivariant(make(AlignedMTL), gram, losses, perm, engine)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    asserts.assert_scale_invariant(make(AlignedMTL), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(AlignedMTL), num_tasks, engine, zero_weight=1.0)
    asserts.assert_nan_for_non_finite_gram(make(AlignedMTL), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(AlignedMTL), [[4.0]], engine=engine), [1.0], rtol=1e-5)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(AlignedMTL), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    """The torch step runs a weighting it does not solve on the host with
    direct torch calls (`ops=torch_ops`): the same weights as keras.ops."""
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(
        AlignedMTL, torch_ops, ("aligned", "random", "mixed", "low_rank"), (1, 2, 3, 10, 40)
    )


# ------------------------------------------------------- defining conditions


def _balance_min(gram):
    return aligned_mtl.balance_transformation(gram, "min")


def _balance_median(gram):
    return aligned_mtl.balance_transformation(gram, "median")


def _balance_rmse(gram):
    return aligned_mtl.balance_transformation(gram, "rmse")


BALANCES = {"min": _balance_min, "median": _balance_median, "rmse": _balance_rmse}


@pytest.mark.parametrize("family", ["aligned", "random"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_balanced_gradients_are_orthogonal(family, num_tasks, seed, engine):
    g = gradients(family, num_tasks, seed)
    if family == "random":  # well-conditioned enough for float32 eigh
        g /= np.linalg.norm(g, axis=1, keepdims=True)
    gram = gram_of(g)
    balance = compiled_function(_balance_min, num_tasks)(gram.astype(np.float32))
    balance = np.asarray(ops.convert_to_numpy(balance), np.float64)
    expected, _, values, _ = aligned_weights(gram)
    balanced = balance @ gram @ balance  # Gram matrix of the rows of B G
    error = np.abs(balanced - values.min() * np.eye(num_tasks)).max() / values.min()
    measure("aligned_BMB", error)
    assert error <= 1e-3
    weights = weigh(AlignedMTL(), gram, engine=engine).astype(np.float64)
    np.testing.assert_allclose(weights, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("num_tasks", [1, 2, 10])
def test_scale_modes_and_rank(scale_mode, num_tasks, engine):
    for family in ("aligned", "low_rank"):
        gram = gram_of(gradients(family, num_tasks, 2))
        expected, _, values, scale = aligned_weights(gram, scale_mode)
        weights = weigh(AlignedMTL(scale_mode=scale_mode), gram, engine=engine).astype(np.float64)
        np.testing.assert_allclose(weights, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())
        # Rank R: B M B is the scale times the projector on the R kept directions.
        balance = compiled_function(BALANCES[scale_mode], num_tasks)(gram.astype(np.float32))
        balance = np.asarray(ops.convert_to_numpy(balance), np.float64)
        spectrum = np.linalg.eigvalsh(balance @ gram @ balance)
        assert np.sum(spectrum > 1e-3 * spectrum.max()) == len(values)
        np.testing.assert_allclose(spectrum[-len(values) :], scale, rtol=1e-3)


def test_orthogonal_equal_norms_give_ones(engine):
    np.testing.assert_allclose(weigh(AlignedMTL(), 9.0 * np.eye(4), engine=engine), np.ones(4), rtol=1e-6)


# ----------------------------------------------- degenerate, exact reference

# Weights: |w - w_ref| / max_t sum_k |B_tk| (the scale of B 1, which can
# vanish: for gradients in opposite pairs 1 is in M's null space and
# B 1 = 0). Balanced Gram matrix: |B M B - s V_R V_R^T| / s in units of
# eps lambda_max / s (B amplifies the rounding of M by the condition of
# the kept spectrum, up to 1e12 for the badly scaled problems in float64).
# Worst measured: see the report of `pytest -s` (aligned_degenerate_*).
EXACT_TOL = {"float64": {"weights": 1e-10, "balanced": 10.0}, "float32": {"weights": 1e-5, "balanced": 10.0}}


@pytest.mark.parametrize("name,dtype,path", exact_params())
def test_exact_on_degenerate_problems(name, dtype, path):
    """Rank-2 M of T = 5..16 tasks (and badly scaled full-rank M, whose
    numerical rank in float32 is lower): the weights of the paper's
    Algorithm 1 from numpy.linalg.eigh in float64, with the rank rule of
    the input's precision (eigenvalues above max(lambda) T eps); and, on
    the NumPy path, the balanced gradients orthogonal with equal norms on
    the kept directions, B M B = s V_R V_R^T."""
    problem = DEGENERATE[name]
    gram, tol = problem.gram, EXACT_TOL[dtype]
    eps = float(np.finfo(dtype).eps)
    expected, balance, values, scale = aligned_weights(gram, eps=eps)
    weights = weigh_in(AlignedMTL(), gram, dtype, path)
    error = np.abs(weights - expected).max() / np.abs(balance).sum(1).max()
    measure(f"aligned_degenerate_weights_{dtype}_{path}", error)
    assert error <= tol["weights"], error
    if path == "numpy":
        with np.errstate(all="ignore"):
            ours = aligned_mtl.balance_transformation(gram.astype(dtype), ops=numpy_ops).astype(np.float64)
        _, vectors = np.linalg.eigh(gram)
        kept = vectors[:, len(gram) - len(values) :]
        balanced = np.abs(ours @ gram @ ours - scale * kept @ kept.T).max() / (eps * values.max())
        measure(f"aligned_degenerate_BMB_{dtype}", balanced)
        assert balanced <= tol["balanced"], balanced


def test_float64_keras_ops_path_is_float64_accurate():
    """Given float64, the method computes in float64 through keras.ops as
    through NumPy (eagerly; JAX computes in float32 unless x64 is on)."""
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("aligned_mtl_float64_paths", asserts.assert_float64_paths_agree(AlignedMTL(), g @ g.T))


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's Aligned-MTL weights on the same Gramian, for the three
    scale modes. torchjd applies B to the mean weighting (1/T): its weights
    are ours divided by T."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    for scale_mode in ("min", "median", "rmse"):
        expected = aggregation.AlignedMTLWeighting(scale_mode=scale_mode)(torch.from_numpy(gram)).numpy()
        expected = expected * num_tasks
        for dtype, path, rtol in (("float64", "numpy", 1e-12), ("float32", "keras", 1e-5)):
            weights = weigh_in(AlignedMTL(scale_mode=scale_mode), gram.astype(dtype).astype(np.float64), dtype, path)
            error = np.abs(weights - expected).max() / np.abs(expected).max()
            measure(f"aligned_vs_torchjd_{dtype}", error)
            assert error <= rtol, (scale_mode, dtype, error)
