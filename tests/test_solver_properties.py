"""Property-based tests of the min-norm solver (Hypothesis): on random
positive semi-definite Gram matrices, rank-deficient, badly scaled (task
norms 1e-4 to 1e4 apart) and near-singular (a gradient within 1e-7 of a
combination of the others), the solution satisfies the KKT conditions of
min a^T M a on the simplex: a >= 0, sum a = 1, (M a)_i >= a^T M a for
every task, with equality on the support.

Checked in float64 (NumPy, to 1e3 eps relative to max M_ii) and in
float32 as the model solves it (keras.ops, to 1e3 eps32 relative to the
largest entry of M a's scale). Pure maths: one backend.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_mgda import solvers
from keras_mgda.backend import numpy_ops

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="pure maths: run on one backend")

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


@st.composite
def gradients(draw):
    """(T, D) float64 task gradients: T in 1..8 of rank 1..T, norms spread
    over 10^-spread..10^spread, optionally one made near-dependent."""
    num_tasks = draw(st.integers(1, 8))
    rank = draw(st.integers(1, num_tasks))
    spread = draw(st.sampled_from([0.0, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((num_tasks, rank)) @ rng.standard_normal((rank, rank + 2))
    g *= 10.0 ** rng.uniform(-spread, spread, (num_tasks, 1))
    if draw(st.booleans()) and num_tasks > 2:  # near-singular
        g[-1] = g[0] - g[1] + 1e-7 * np.linalg.norm(g[0]) * rng.standard_normal(g.shape[1])
    return g


def kkt_violation(gram, alpha):
    """max(a^T M a - (M a)_i, |(M a)_i - a^T M a| on the support), relative
    to max M_ii."""
    gram_alpha = gram @ alpha
    value = alpha @ gram_alpha
    support = alpha > 1e-3 * alpha.max()
    violation = max(np.max(value - gram_alpha), np.max(np.abs(gram_alpha[support] - value)))
    return violation / np.max(np.diag(gram))


def check_simplex(alpha, tol):
    assert np.all(np.isfinite(alpha)) and np.all(alpha >= 0), alpha
    assert abs(alpha.sum() - 1.0) <= tol, alpha.sum()


@SETTINGS
@given(gradients())
def test_kkt_in_float64(g):
    gram = g @ g.T
    alpha = np.asarray(solvers.min_norm(gram, ops=numpy_ops), np.float64)
    check_simplex(alpha, 1e-12)
    assert kkt_violation(gram, alpha) <= 1e3 * np.finfo(np.float64).eps


@SETTINGS
@given(gradients())
def test_kkt_in_float32(g):
    gram = (g @ g.T).astype(np.float32)
    alpha = np.asarray(keras.ops.convert_to_numpy(solvers.min_norm(keras.ops.convert_to_tensor(gram))), np.float64)
    check_simplex(alpha, 1e-6)
    assert kkt_violation(gram.astype(np.float64), alpha) <= 1e3 * np.finfo(np.float32).eps


@SETTINGS
@given(gradients(), st.integers(-30, 30))
def test_scale_invariance(g, exponent):
    """M and 2^k M (exact) give the same weights, bit for bit."""
    gram = g @ g.T
    base = solvers.min_norm(gram, ops=numpy_ops)
    np.testing.assert_array_equal(solvers.min_norm(gram * 2.0**exponent, ops=numpy_ops), base)
