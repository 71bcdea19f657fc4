"""Property-based tests of the Gram-matrix weightings (Hypothesis), on
random Gram matrices: rank-deficient, badly scaled (task norms 1e-4 to 1e4
apart), near-singular. Each method is held to what it promises:

- simplex: MGDA's and SDMGrad's weights are >= 0 and sum to 1;
- no conflict: the update d = G^T w does not conflict with any task to
  first order, (M w)_i >= 0 (MGDA without gradient normalisation, UPGrad,
  DualProj), to the solvers' float32 precision;
- scale invariance: M and 2^k M give the same weights, bit for bit (MGDA,
  UPGrad, DualProj, IMTL-G, SDMGrad, CAGrad, Aligned-MTL, ConFIG), or
  weights scaled by 2^(-k/2) (Nash-MTL, whose update has a fixed length);
- permutation equivariance: reordering the tasks reorders the weights
  (these and Nash-MTL, FairGrad; in float64).

In float32 on the host path the torch step uses (`numpy_ops`) where the
method is solved there, else keras.ops: one backend, pure maths.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_mgda import weighting as weighting_lib
from keras_mgda.backend import numpy_ops

from ._calling import weigh

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="pure maths: run on one backend")

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
SCALE_FREE = ["mgda", "upgrad", "dualproj", "imtlg", "sdmgrad", "cagrad", "alignedmtl", "config"]
NO_CONFLICT = ["mgda", "upgrad", "dualproj"]
STATELESS = SCALE_FREE + ["nashmtl", "fairgrad"]


@st.composite
def grams(draw, min_tasks=2):
    """A float32 Gram matrix (as float64) of T in 2..8 gradients of rank
    1..T, norms 10^-spread..10^spread, optionally one near-dependent."""
    num_tasks = draw(st.integers(min_tasks, 8))
    rank = draw(st.integers(1, num_tasks))
    spread = draw(st.sampled_from([0.0, 1.0, 4.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    g = rng.standard_normal((num_tasks, rank)) @ rng.standard_normal((rank, rank + 2))
    g *= 10.0 ** rng.uniform(-spread, spread, (num_tasks, 1))
    if draw(st.booleans()) and num_tasks > 2:
        g[-1] = g[0] - g[1] + 1e-7 * np.linalg.norm(g[0]) * rng.standard_normal(g.shape[1])
    return (g @ g.T).astype(np.float32).astype(np.float64)


def make(name):
    # MGDA's promises are the min-norm point's: no gradient normalisation.
    return weighting_lib.MGDA(normalization="none") if name == "mgda" else weighting_lib.get(name)


def weights_of(name, gram):
    """float32, as the torch step solves it (on the host where it does)."""
    return weigh(make(name), gram, engine="numpy").astype(np.float64)


def weights64(name, gram):
    """float64 through NumPy: the algorithm, with little rounding."""
    with np.errstate(all="ignore"):
        return np.asarray(make(name)(np.ones(len(gram)), gram, ops=numpy_ops), np.float64)


@SETTINGS
@given(grams(), st.sampled_from(["mgda", "sdmgrad"]))
def test_simplex(gram, name):
    weights = weights_of(name, gram)
    assert np.all(weights >= 0) and abs(weights.sum() - 1.0) <= 1e-5, weights


@SETTINGS
@given(grams(), st.sampled_from(NO_CONFLICT))
def test_no_conflict(gram, name):
    """(M w)_i >= 0 to the solvers' float32 precision, 1e3 eps relative to
    the problem's scale max_i M_ii sum |w| (a task 1e8 times smaller than
    the largest is resolved only to that)."""
    weights = weights_of(name, gram)
    scale = np.max(np.diag(gram)) * np.abs(weights).sum()
    assert np.min(gram @ weights) >= -1e3 * np.finfo(np.float32).eps * scale, (gram @ weights, weights)


@SETTINGS
@given(grams(), st.sampled_from(SCALE_FREE + ["nashmtl"]), st.integers(-40, 40))
def test_scale_invariance(gram, name, exponent):
    base = weights_of(name, gram)
    scaled = weights_of(name, gram * 2.0**exponent)
    if name == "nashmtl":  # alpha in units of 1 / |g|
        np.testing.assert_allclose(scaled * 2.0 ** (exponent / 2), base, rtol=1e-5, atol=1e-6 * np.abs(base).max())
    else:
        np.testing.assert_array_equal(scaled, base)


@SETTINGS
@given(grams(), st.sampled_from(STATELESS), st.randoms(use_true_random=False))
def test_permutation_equivariance(gram, name, random):
    """In float64 (an ill-conditioned float32 problem moves with the
    rounding of its entries, whatever their order)."""
    order = list(range(len(gram)))
    random.shuffle(order)
    base = weights64(name, gram)
    permuted = weights64(name, gram[np.ix_(order, order)])
    np.testing.assert_allclose(permuted, base[order], rtol=1e-6, atol=1e-7 * np.abs(base).max())
