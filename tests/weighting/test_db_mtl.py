"""DB-MTL (Lin et al. 2023): log losses, an exponential moving average of
the log-loss gradients b_t <- beta_k b_t + (1 - beta_k) g_t / (L_t + eps),
beta_k = beta / k^beta_sigma, and the update sum_t a_t b_t with a_t =
max_s |b_s| / (|b_t| + eps).

torchjd has no DB-MTL. The reference is a NumPy transcription of the
authors' code (LibMTL's `DB_MTL.backward`, re-derived from its equations,
`libmtl_update` below), and the tests compare the *update* with it over
several steps: bit for bit up to float32 rounding in parameters mode
(which keeps the averages of the gradient vectors, as LibMTL), and in
representation mode wherever each task's gradient keeps its direction
(the average of norms it keeps then equals LibMTL's norm of the average),
including the change of gradient norm G = diag(1, 3) -> diag(2, 3). Where
directions turn, representation mode differs on purpose (the Z-gradients
of different batches cannot be averaged), and the test says by how much.
Also: the degenerate-input policy (solved tasks, zero gradients, NaN),
loss scale invariance, head weights, mixed precision's loss scale.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.db_mtl import DBMTL

from . import _asserts as asserts
from ._aggregating import aggregate
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh
from ._problems import gradients
from ._problems import gram_of

EPS = 1e-8
SHAPES = [(3, 2), (4,)]


def built(num_tasks, shapes=None, **options):
    weighting = DBMTL(**options)
    if weighting.mode == "parameters":
        weighting.set_gradient_shapes(shapes or [(gradients("random", num_tasks, 0).shape[1],)])
    weighting.build(num_tasks)
    return weighting


def head(weighting, weights):
    return np.asarray(ops.convert_to_numpy(weighting.head_weights(ops.convert_to_tensor(weights))))


def libmtl_update(g_steps, loss_steps, beta=0.9, beta_sigma=0.0):
    """LibMTL's DB-MTL in float64: for each step, the update sum_t a_t b_t
    and the per-task terms a_t b_t (T, D), from (T, D) gradients and (T,)
    losses."""
    buffer = np.zeros_like(g_steps[0], np.float64)
    out = []
    for step, (g, losses) in enumerate(zip(g_steps, loss_steps, strict=True), start=1):
        log_grads = g / (losses + EPS)[:, None]  # the gradients of log(L + 1e-8)
        decay = beta / step**beta_sigma
        buffer = log_grads + decay * (buffer - log_grads)
        norms = np.linalg.norm(buffer, axis=1)
        terms = (norms.max() / (norms + EPS))[:, None] * buffer
        out.append((terms.sum(axis=0), terms))
    return out


def representation_update(weighting, g, losses):
    weights = weigh(weighting, gram_of(g), losses)
    return weights @ g, weights


def parameters_update(weighting, g, losses):
    directions, weights = aggregate(weighting, [g], losses)
    return directions[0], weights


# ------------------------------------------------------------- interface


def test_config_round_trip():
    asserts.assert_config_round_trip(
        DBMTL, {"beta": 0.5, "beta_sigma": 0.5, "mode": "parameters", "head_update": "full", "epsilon": 1e-6}
    )
    default = DBMTL()
    assert DBMTL.requires_gram and default.gradient_space == "representation" and default.head_update == "log"
    assert not default.aggregates_gradients and not default.needs_gradient_shapes
    parameters = DBMTL(mode="parameters")
    assert parameters.gradient_space == "parameters" and parameters.aggregates_gradients
    assert parameters.needs_gradient_shapes
    with pytest.raises(ValueError, match="log"):
        DBMTL(head_update="half")
    with pytest.raises(ValueError, match="representation"):
        DBMTL(mode="shared")
    with pytest.raises(ValueError, match="beta"):
        DBMTL(beta=1.5)


# --------------------------------------------------------- the update


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_norm_change_of_the_issue(mode):
    """G = diag(1, 3), L = (1, 1), beta = 0.9: LibMTL's terms are as long as
    each other and grow as the average fills, [0.30, 0.30], [0.57, 0.57],
    [0.81, 0.81]; at step 4 task 0's gradient doubles: [1.03, 1.03]."""
    g_steps = [np.diag([1.0, 3.0])] * 3 + [np.diag([2.0, 3.0])]
    loss_steps = [np.ones(2)] * 4
    expected = libmtl_update(g_steps, loss_steps)
    weighting = built(2, shapes=[(2,)], mode=mode)
    update = representation_update if mode == "representation" else parameters_update
    lengths = []
    for (g, losses), (want, want_terms) in zip(zip(g_steps, loss_steps), expected, strict=True):
        got, _ = update(weighting, g, losses)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        lengths.append(np.linalg.norm(want_terms, axis=1))
    np.testing.assert_allclose(np.array(lengths)[:, 0], [0.3, 0.57, 0.813, 1.0317], atol=1e-4)
    np.testing.assert_allclose(np.array(lengths)[:, 1], np.array(lengths)[:, 0], rtol=1e-6)


@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_parameters_mode_is_libmtl(beta, beta_sigma):
    """Gradients that turn and change length every step, several shared
    weights, losses from e^-3 to e^3: LibMTL's update at every step."""
    rng = np.random.default_rng(int(10 * beta))
    weighting = built(4, shapes=SHAPES, mode="parameters", beta=beta, beta_sigma=beta_sigma)
    steps = [[rng.standard_normal((4,) + s).astype(np.float32) for s in SHAPES] for _ in range(6)]
    loss_steps = [np.exp(rng.uniform(-3, 3, 4)).astype(np.float32) for _ in steps]
    flat = [np.concatenate([g.reshape(4, -1) for g in step], axis=1).astype(np.float64) for step in steps]
    expected = libmtl_update(flat, [losses.astype(np.float64) for losses in loss_steps], beta, beta_sigma)
    for step, losses, (want, _) in zip(steps, loss_steps, expected, strict=True):
        directions, _ = aggregate(weighting, step, losses)
        got = np.concatenate([d.reshape(-1) for d in directions])
        error = np.abs(got - want).max() / np.abs(want).max()
        measure("dbmtl_parameters_vs_libmtl", error)
        assert error <= 1e-5, error
    assert float(ops.convert_to_numpy(weighting.steps)) == 6


def test_representation_mode_is_libmtl_when_directions_hold():
    """Each task's gradient keeps its direction and changes its length
    every step: our average of norms is LibMTL's norm of the average, so
    the updates agree."""
    rng = np.random.default_rng(3)
    directions = gradients("random", 3, 5)
    g_steps = [directions * rng.uniform(0.2, 5.0, (3, 1)) for _ in range(6)]
    loss_steps = [np.exp(rng.uniform(-2, 2, 3)).astype(np.float32).astype(np.float64) for _ in g_steps]
    expected = libmtl_update(g_steps, loss_steps, 0.8, 0.3)
    weighting = built(3, beta=0.8, beta_sigma=0.3)
    for g, losses, (want, _) in zip(g_steps, loss_steps, expected, strict=True):
        got, _ = representation_update(weighting, g, losses)
        error = np.abs(got - want).max() / np.abs(want).max()
        measure("dbmtl_representation_vs_libmtl", error)
        assert error <= 1e-5, error


def test_representation_mode_where_directions_turn():
    """Where gradients turn, representation mode differs from LibMTL, as
    its docstring says: every term points along this step's gradient and
    is as long as the longest average of norms (our equations, in
    float64), which is at least LibMTL's longest averaged vector."""
    rng = np.random.default_rng(4)
    weighting = built(3)
    average, g_steps, losses = np.zeros(3), [], np.ones(3)
    for _ in range(5):
        g = rng.standard_normal((3, 6))
        g_steps.append(g)
        average = 0.9 * average + 0.1 * np.linalg.norm(g, axis=1) / (1 + EPS)
        _, weights = representation_update(weighting, g, losses)
        terms = weights[:, None] * g
        np.testing.assert_allclose(np.linalg.norm(terms, axis=1), average.max(), rtol=1e-5)
        cosines = np.sum(terms * g, axis=1) / np.linalg.norm(terms, axis=1) / np.linalg.norm(g, axis=1)
        np.testing.assert_allclose(cosines, 1.0, rtol=1e-5)
        libmtl_terms = libmtl_update(g_steps, [losses] * len(g_steps))[-1][1]
        assert np.linalg.norm(libmtl_terms, axis=1).max() <= average.max() * (1 + 1e-6)
    measure("dbmtl_turning_length_ratio", average.max() / np.linalg.norm(libmtl_terms, axis=1).max())


def test_loss_scale_invariance():
    """L_t -> c_t L_t with g_t -> c_t g_t: the same update."""
    g = gradients("random", 3, 1)
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    scales = np.array([1e-2, 1.0, 1e2], np.float32)
    base, _ = representation_update(built(3), g, losses)
    scaled, _ = representation_update(built(3), g * scales[:, None], losses * scales)
    np.testing.assert_allclose(scaled, base, rtol=1e-5)


def test_loss_scale_of_mixed_precision_is_divided_out():
    """Parameters mode receives gradients times the loss scale (the Gram
    matrix without it): the averages hold the unscaled gradients, the
    direction carries the scale."""
    rng = np.random.default_rng(5)
    step = [rng.standard_normal((3,) + s).astype(np.float32) for s in SHAPES]
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    plain, scaled = (built(3, shapes=SHAPES, mode="parameters") for _ in range(2))
    want, _ = aggregate(plain, step, losses)
    got, _ = aggregate(scaled, [g * 1024.0 for g in step], losses, gram=float32_gram(step))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, 1024.0 * b, rtol=1e-5)
    for a, b in zip(scaled.buffers, plain.buffers, strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-5)


def float32_gram(step):
    flat = np.concatenate([g.reshape(3, -1) for g in step], axis=1).astype(np.float64)
    return (flat @ flat.T).astype(np.float32)


def test_head_update_options():
    weights = np.array([0.5, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(head(built(3, head_update="full"), weights), np.ones(3))
    np.testing.assert_array_equal(head(built(3, head_update="scaled"), weights), weights)
    weighting = built(3)
    losses = np.array([0.5, 2.0, 0.0], np.float32)
    weigh(weighting, gram_of(gradients("random", 3, 1)), losses)
    np.testing.assert_allclose(head(weighting, weights), [1 / (0.5 + EPS), 1 / (2 + EPS), 0.0], rtol=1e-6)


# ------------------------------------------------------ degenerate input


def _averages_of_task(weighting, task):
    """What the weighting averages for one task (norms or vectors)."""
    averages = weighting.buffers if weighting.mode == "parameters" else [weighting.norm_average]
    return [np.array(ops.convert_to_numpy(v))[task] for v in averages]


@pytest.mark.parametrize("mode", ["representation", "parameters"])
def test_a_solved_task_is_left_out(mode):
    """A zero loss with a nonzero gradient: LibMTL's guard would stretch
    every task to 1e8 times its gradient; here the task gets weight 0 and
    head weight 0, its average stays, and the others are balanced among
    themselves (LibMTL's update of those two tasks alone)."""
    g = gradients("random", 3, 2)
    weighting = built(3, shapes=[(g.shape[1],)], mode=mode)
    update = representation_update if mode == "representation" else parameters_update
    update(weighting, g, np.ones(3))
    before = _averages_of_task(weighting, 1)
    got, weights = update(weighting, g, np.array([1.0, 0.0, 1.0]))
    assert weights[1] == 0 and np.all(np.isfinite(weights))
    assert head(weighting, weights)[1] == 0
    expected = libmtl_update([g[[0, 2]]] * 2, [np.ones(2)] * 2)[-1][0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for a, b in zip(_averages_of_task(weighting, 1), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 40])
def test_degenerate_grams(num_tasks):
    """Finite weights on every degenerate Gram matrix; M = 0 gives 0 (no
    gradient to balance); NaN or infinite M gives NaN and leaves the
    state; a NaN loss gives NaN."""
    for name, gram in asserts.degenerate_grams(num_tasks).items():  # fresh state for each
        weights = weigh(built(num_tasks), gram)
        assert np.all(np.isfinite(weights)), name
        if name == "zero":
            np.testing.assert_array_equal(weights, np.zeros(num_tasks))
    weighting = built(num_tasks)
    asserts.assert_nan_for_non_finite_gram(weighting, num_tasks, "keras")
    np.testing.assert_array_equal(ops.convert_to_numpy(weighting.norm_average), np.zeros(num_tasks))
    assert float(ops.convert_to_numpy(weighting.steps)) == 0
    losses = np.ones(num_tasks, np.float32)
    losses[0] = np.nan
    assert np.all(np.isnan(weigh(built(num_tasks), np.eye(num_tasks), losses)))


def test_zero_gradient_gets_no_weight():
    g = gradients("random", 3, 3)
    g[1] = 0.0
    weights = weigh(built(3), gram_of(g))
    assert weights[1] == 0.0 and np.all(weights[[0, 2]] > 0)


@pytest.mark.all_backends  # TensorFlow XLA: skipped elsewhere
def test_compiles_with_xla():
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's XLA path; on JAX every test runs under jax.jit already")
    gram = gram_of(gradients("random", 3, 4))
    compiled, plain = built(3), built(3)
    for _ in range(3):  # the moving average too
        np.testing.assert_allclose(weigh(compiled, gram, xla=True), weigh(plain, gram), rtol=1e-5)
