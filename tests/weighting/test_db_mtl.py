"""DB-MTL (Lin et al. 2023): log losses, and the log-loss gradients rescaled
to the largest of their (moving-average) norms: w_t = a_t / (L_t + eps),
a_t = max(n) / (n_t + eps), n <- b_k n + (1 - b_k) sqrt(M_tt) / (L_t + eps),
b_k = beta / k^beta_sigma.

torchjd has no DB-MTL. Checked: the config and options; over several
steps (the moving average), the weights and head weights against a NumPy
reference of those equations; against the authors' code (LibMTL's
`DB_MTL`, a moving average of the gradient vectors, written in NumPy) on
gradients that keep their direction, where the two agree exactly; the
balance (every rescaled log-loss gradient has the largest norm) and loss
scale invariance; degenerate and non-finite input.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.db_mtl import DBMTL

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of

EPS = 1e-8


def built(num_tasks, **options):
    weighting = DBMTL(**options)
    weighting.build(num_tasks)
    return weighting


def head(weighting, weights):
    return np.asarray(ops.convert_to_numpy(weighting.head_weights(ops.convert_to_tensor(weights))))


class Reference:
    """Our equations in float64: the moving average of the log-loss
    gradients' norms."""

    def __init__(self, num_tasks, beta=0.9, beta_sigma=0.0):
        self.average = np.zeros(num_tasks)
        self.step = 0
        self.beta, self.beta_sigma = beta, beta_sigma

    def weights(self, gram, losses):
        self.step += 1
        b = self.beta / self.step**self.beta_sigma
        slopes = 1 / (losses + EPS)
        self.average = b * self.average + (1 - b) * np.sqrt(np.diag(gram)) * slopes
        return self.average.max() / (self.average + EPS) * slopes


def libmtl_balance(g_steps, loss_steps, beta, beta_sigma):
    """LibMTL's `DB_MTL.backward` in NumPy: the moving average of the
    log-loss gradient vectors and its balance a_t = max |buffer| /
    (|buffer_t| + eps), at every step."""
    buffer = np.zeros_like(g_steps[0])
    balances = []
    for step, (g, losses) in enumerate(zip(g_steps, loss_steps), start=1):
        batch = g / (losses + EPS)[:, None]  # the gradients of log(L + 1e-8)
        buffer = batch + (beta / step**beta_sigma) * (buffer - batch)
        norms = np.linalg.norm(buffer, axis=1)
        balances.append(norms.max() / (norms + EPS))
    return balances


def test_config_round_trip():
    asserts.assert_config_round_trip(
        DBMTL, {"beta": 0.5, "beta_sigma": 0.5, "mode": "parameters", "head_update": "full", "epsilon": 1e-6}
    )
    default = DBMTL()
    assert DBMTL.requires_gram and default.gradient_space == "representation" and default.head_update == "log"
    assert DBMTL(mode="parameters").gradient_space == "parameters"
    with pytest.raises(ValueError, match="log"):
        DBMTL(head_update="half")
    with pytest.raises(ValueError, match="representation"):
        DBMTL(mode="shared")
    with pytest.raises(ValueError, match="beta"):
        DBMTL(beta=1.5)


@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_agrees_with_the_equations_over_steps(beta, beta_sigma):
    rng = np.random.default_rng(int(10 * beta))
    ours, reference = built(4, beta=beta, beta_sigma=beta_sigma), Reference(4, beta, beta_sigma)
    for step in range(8):
        gram = gram_of(gradients("mixed", 4, step))
        losses = np.exp(rng.uniform(-3, 3, 4)).astype(np.float32)
        weights = weigh(ours, gram, losses)
        expected = reference.weights(gram, losses.astype(np.float64))
        error = np.abs(weights / expected - 1).max()
        measure("dbmtl_vs_numpy", error)
        assert error <= 2e-5, (step, error)
        np.testing.assert_allclose(head(ours, weights), 1 / (losses + EPS), rtol=1e-6)
    assert float(ops.convert_to_numpy(ours.steps)) == 8


def test_agrees_with_the_authors_code_when_directions_hold():
    """Each task's gradient keeps its direction, its length changes every
    step: the authors' average of vectors has the norms of our average of
    norms, so the balances a_t agree (and both make every rescaled
    log-loss gradient as long as the longest)."""
    rng = np.random.default_rng(3)
    directions = gradients("random", 3, 5)
    g_steps, loss_steps, ours = [], [], built(3, beta=0.8, beta_sigma=0.3)
    for _ in range(6):
        g_steps.append(directions * rng.uniform(0.2, 5.0, (3, 1)))
        loss_steps.append(np.exp(rng.uniform(-2, 2, 3)).astype(np.float32).astype(np.float64))
    expected = libmtl_balance(g_steps, loss_steps, 0.8, 0.3)
    for step, (g, losses) in enumerate(zip(g_steps, loss_steps)):
        balance = weigh(ours, gram_of(g), losses) * (losses + EPS)
        error = np.abs(balance / expected[step] - 1).max()
        measure("dbmtl_vs_libmtl", error)
        assert error <= 2e-5, (step, error)


def test_loss_scale_invariance():
    """L_t -> c_t L_t with g_t -> c_t g_t (M -> C M C): w_t -> w_t / c_t, the
    same update."""
    g = gradients("random", 3, 1)
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    scales = np.array([1e-2, 1.0, 1e2], np.float32)
    base = weigh(built(3), gram_of(g), losses)
    scaled = weigh(built(3), gram_of(g * scales[:, None]), losses * scales)
    np.testing.assert_allclose(scaled * scales, base, rtol=1e-5)


def test_head_update_options():
    weights = np.array([0.5, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(head(built(3, head_update="full"), weights), np.ones(3))
    np.testing.assert_array_equal(head(built(3, head_update="scaled"), weights), weights)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams(num_tasks):
    """Finite weights on every degenerate Gram matrix; M = 0 gives 0 (no
    gradient to balance); NaN or infinite M gives NaN and leaves the
    state."""
    for name, gram in asserts.degenerate_grams(num_tasks).items():  # fresh state for each
        weights = weigh(built(num_tasks), gram)
        assert np.all(np.isfinite(weights)), name
        if name == "zero":
            np.testing.assert_array_equal(weights, np.zeros(num_tasks))
    weighting = built(num_tasks)
    asserts.assert_nan_for_non_finite_gram(weighting, num_tasks, "keras")
    np.testing.assert_array_equal(ops.convert_to_numpy(weighting.norm_average), np.zeros(num_tasks))
    losses = np.ones(num_tasks, np.float32)
    losses[0] = np.nan
    assert np.all(np.isnan(weigh(built(num_tasks), np.eye(num_tasks), losses)))


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    gram = gram_of(gradients("random", 3, 4))
    compiled, plain = built(3), built(3)
    for _ in range(3):  # the moving average too
        np.testing.assert_allclose(weigh(compiled, gram, xla=True), weigh(plain, gram), rtol=1e-5)
