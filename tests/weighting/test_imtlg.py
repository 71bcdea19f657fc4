"""IMTL-G (Liu et al. 2021): weights alpha summing to 1 whose update
g = sum_t alpha_t g_t has equal projections g . u_t on every unit gradient
(the negated weights, summing to -1, where that common projection would be
negative).

Checked: the shared properties (_asserts.py); equal projections on random
problems and the closed forms; on the degenerate problems, the paper's
equations against a NumPy reference (`references.imtl_weights`) where M is
nonsingular, and where it is singular (T > rank: equal projections force
g = 0) the zero update, in float32 and float64; and torchjd's IMTL-G on
random full-rank problems.
"""

import numpy as np
import pytest
from references import imtl_weights

from keras_mgda.weighting.imtl import IMTLG

from . import _asserts as asserts
from ._calling import BACKEND
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

WEIGHTING = IMTLG  # conftest: the engines follow its solvable_on_host
OPTIONS = {"mode": "parameters", "head_update": "scaled"}


# ------------------------------------------------------------- shared


def test_config_round_trip():
    asserts.assert_config_round_trip(IMTLG, OPTIONS)
    asserts.assert_gradient_options(IMTLG, default_head_update="full")


def test_invalid_options_raise():
    asserts.assert_invalid_options_raise(IMTLG)


def test_head_weights():
    asserts.assert_head_weights(IMTLG)


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_task_order_invariance(num_tasks, engine):
    gram = gram_of(gradients("random", num_tasks, 7))
    rng = np.random.default_rng(num_tasks)
    perm = rng.permutation(num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks)
    asserts.assert_permutation_equivariant(make(IMTLG), gram, losses, perm, engine)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_scale_invariance(num_tasks, engine):
    asserts.assert_scale_invariant(make(IMTLG), gram_of(gradients("random", num_tasks, 8)), engine)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams_give_finite_weights(num_tasks, engine):
    asserts.assert_finite_on_degenerate_grams(make(IMTLG), num_tasks, engine, zero_weight=1.0 / num_tasks)
    asserts.assert_nan_for_non_finite_gram(make(IMTLG), num_tasks, engine)


def test_single_task(engine):
    np.testing.assert_allclose(weigh(make(IMTLG), [[4.0]], engine=engine), [1.0], rtol=1e-5)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    asserts.assert_compiled_equals_plain(make(IMTLG), gram_of(gradients("random", 3, 4)))


@pytest.mark.skipif(BACKEND != "torch", reason="the direct-torch namespace is torch's")
def test_direct_torch_namespace_gives_the_same_weights():
    """The torch step runs a weighting it does not solve on the host with
    direct torch calls (`ops=torch_ops`): the same weights as keras.ops."""
    from keras_mgda.backend import torch_ops

    asserts.assert_namespaces_agree(IMTLG, torch_ops, ("aligned", "random", "mixed", "low_rank"), (1, 2, 3, 10, 40))


# ------------------------------------------------------- defining conditions


@pytest.mark.parametrize("family", ["random", "aligned", "mixed"])
@pytest.mark.parametrize("num_tasks,seed", CASES)
def test_equal_projections(family, num_tasks, seed, engine):
    gram = gram_of(gradients(family, num_tasks, seed))
    alpha = weigh(IMTLG(), gram, engine=engine).astype(np.float64)
    np.testing.assert_allclose(abs(alpha.sum()), 1.0, rtol=1e-5)
    projections = gram @ alpha / np.sqrt(np.diag(gram))
    scale = np.sqrt(max(alpha @ gram @ alpha, 0.0))
    spread = np.ptp(projections) / scale
    measure(f"imtl_spread_{family}", spread)
    assert spread <= 1e-4
    # Equal and positive: every task improves at the same rate.
    assert projections.min() > 0
    if family == "aligned":  # (the closed form itself, summing to 1)
        np.testing.assert_allclose(alpha.sum(), 1.0, rtol=1e-5)


def test_negative_common_projection_is_flipped(engine):
    """Gradients (norms over 8 orders of magnitude) for which the closed
    form with sum(alpha) = 1 increases every loss: the weights are negated."""
    found = 0
    for seed in range(200):
        g = gradients("mixed", 10, seed + 100)
        gram = gram_of(g)
        u = g / np.linalg.norm(g, axis=1, keepdims=True)
        beta = np.linalg.solve(u @ u.T, np.ones(10))  # C beta = 1 (c = 1)
        closed = beta / np.linalg.norm(g, axis=1)
        if closed.sum() > 0:
            continue
        found += 1  # normalised to sum 1, c = 1 / sum < 0
        alpha = weigh(IMTLG(), gram, engine=engine).astype(np.float64)
        np.testing.assert_allclose(alpha, -closed / closed.sum(), rtol=1e-3, atol=1e-6 * np.abs(alpha).max())
        assert np.all(gram @ alpha > 0)
        if found == 2:
            break
    assert found


def test_two_tasks_closed_form(engine):
    """The paper's formula alpha_2 = g_1 U^T (D U^T)^-1 for T = 2."""
    g = np.array([[3.0, 0.0], [1.0, 2.0]])
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    a2 = (g[0] @ (u[0] - u[1])) / ((g[0] - g[1]) @ (u[0] - u[1]))
    np.testing.assert_allclose(weigh(IMTLG(), gram_of(g), engine=engine), [1 - a2, a2], rtol=1e-5)


def test_zero_gradient_task_is_left_out(engine):
    g = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    gram = gram_of(g)
    alpha = weigh(IMTLG(), gram, engine=engine).astype(np.float64)
    assert alpha[1] == 0.0
    projections = (gram @ alpha)[[0, 2]] / np.sqrt(np.diag(gram)[[0, 2]])
    np.testing.assert_allclose(projections[0], projections[1], rtol=1e-5)


# ----------------------------------------------- degenerate, exact reference

# Worst measured: full rank (unique weights) 1.1e-16 / 6.7e-8 (float64 /
# float32) from the reference; singular M: |g| / sum_t |alpha_t| |g_t|
# 3.7e-9 / 9.3e-7 (the ridge of the solve, refined three times), and
# max_t |alpha_t| |g_t| / max_t |g_t| up to 28 (plane_outside_T5: gradients
# within 120 degrees cancel only with large weights of both signs).
EXACT_TOL = {"float64": {"weights": 1e-10, "update": 1e-7}, "float32": {"weights": 1e-5, "update": 1e-5}}


@pytest.mark.parametrize("name,dtype,path", exact_params())
def test_exact_on_degenerate_problems(name, dtype, path):
    """Badly scaled full-rank M: the weights of the paper's equations
    (`references.imtl_weights`). Singular M (T gradients in a plane, T > 2):
    equal projections g . u_t = c on more than two directions of a plane
    force g = 0 (c = 0), so the update is zero to rounding, with weights
    that sum to +-1 and stay finite and bounded."""
    problem = DEGENERATE[name]
    gram, tol = problem.gram, EXACT_TOL[dtype]
    alpha = weigh_in(IMTLG(), gram, dtype, path)
    norms = np.sqrt(np.diag(gram))
    measure(f"imtl_degenerate_bound_{dtype}", asserts.assert_bounded(alpha, gram, bound=100.0))
    np.testing.assert_allclose(abs(alpha.sum()), 1.0, rtol=1e-5)
    if problem.rank == problem.num_tasks:
        expected = imtl_weights(gram)
        error = np.abs(alpha - expected).max() / np.abs(expected).max()
        measure(f"imtl_degenerate_weights_{dtype}_{path}", error)
        assert error <= tol["weights"], error
    else:
        update = np.sqrt(max(alpha @ gram @ alpha, 0.0)) / (np.abs(alpha) @ norms)
        measure(f"imtl_degenerate_update_{dtype}_{path}", update)
        assert update <= tol["update"], update


def test_float64_keras_ops_path_is_float64_accurate():
    """Given float64, the method computes in float64 through keras.ops as
    through NumPy (eagerly; JAX computes in float32 unless x64 is on)."""
    if BACKEND == "jax":
        pytest.skip("JAX computes in float32 unless its 64-bit mode is on")
    g = well_conditioned(5, 0)
    measure("imtlg_float64_paths", asserts.assert_float64_paths_agree(IMTLG(), g @ g.T))


# ------------------------------------------------------------ torchjd


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks,seed", [(t, s) for t in range(2, 11) for s in (0, 1)])
def test_agrees_with_torchjd(num_tasks, seed):
    """torchjd's IMTL-G weights pinv(M) |g| / sum(pinv(M) |g|) on the same
    Gramian (independent gradients in R^20, M nonsingular): the same
    equations, summing to 1. Where that common projection is negative ours
    are negated (sum -1, see `IMTLG`): compared after undoing it."""
    torch = pytest.importorskip("torch")
    aggregation = pytest.importorskip("torchjd.aggregation")

    g = well_conditioned(num_tasks, seed)
    gram = g @ g.T
    expected = aggregation.IMTLGWeighting()(torch.from_numpy(gram)).numpy()
    for dtype, path, rtol in (("float64", "numpy", 1e-12), ("float32", "keras", 1e-5)):
        alpha = weigh_in(IMTLG(), gram.astype(dtype).astype(np.float64), dtype, path)
        alpha = alpha * np.sign(alpha.sum())
        error = np.abs(alpha - expected).max() / np.abs(expected).max()
        measure(f"imtl_vs_torchjd_{dtype}", error)
        assert error <= rtol, (dtype, error)
