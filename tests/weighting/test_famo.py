"""FAMO (Liu et al. 2023): weights w = (z / D) / sum(z / D), z = softmax(xi),
D = L - b + eps; after each step the logits xi take one Adam step (torch's,
with L2 weight decay) on J_softmax^T delta, delta = log D(before) - log D(after).

Checked: the config and options; over 30 steps of random loss changes,
the weights and the logits against a NumPy reference of those equations
(every backend) and against torchjd's FAMO (torch); the defining
behaviour: the task whose loss fell most loses weight, and rescaling a
loss changes neither the logits' update nor the direction of the step;
a non-finite loss change leaves the state as it was; degenerate losses.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.famo import FAMO

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh


def built(num_tasks, **options):
    weighting = FAMO(**options)
    weighting.build(num_tasks, [f"t{i}" for i in range(num_tasks)])
    return weighting


def loss_weights(weighting, losses):
    losses = np.asarray(losses, np.float32)
    return weigh(weighting, np.eye(len(losses)), losses)


def numpy_of(variable):
    return np.asarray(ops.convert_to_numpy(variable), np.float64)


class Reference:
    """The paper's equations with torch.optim.Adam's update, in float64."""

    def __init__(self, num_tasks, lr=0.025, weight_decay=1e-3, bounds=0.0, eps=1e-8):
        self.xi = np.zeros(num_tasks)
        self.m = np.zeros(num_tasks)
        self.v = np.zeros(num_tasks)
        self.t = 0
        self.lr, self.wd, self.bounds, self.eps = lr, weight_decay, bounds, eps

    def weights(self, losses):
        z = np.exp(self.xi - self.xi.max())
        z /= z.sum()
        ratio = z / (losses - self.bounds + self.eps)
        return ratio / ratio.sum()

    def update(self, losses, new_losses):
        delta = np.log(losses - self.bounds + self.eps) - np.log(new_losses - self.bounds + self.eps)
        z = np.exp(self.xi - self.xi.max())
        z /= z.sum()
        grad = (np.diag(z) - np.outer(z, z)) @ delta + self.wd * self.xi
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad**2
        m_hat = self.m / (1 - 0.9**self.t)
        v_hat = self.v / (1 - 0.999**self.t)
        self.xi = self.xi - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def loss_changes(num_tasks, steps, seed):
    """(before, after) pairs: losses 1e-2 to 1e2, each falling (or rising)
    by a task-dependent rate."""
    rng = np.random.default_rng([seed, num_tasks])
    rates = rng.uniform(-0.05, 0.3, num_tasks)
    for _ in range(steps):
        before = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), num_tasks)).astype(np.float32)
        after = (before * np.exp(-rates * rng.uniform(0.5, 1.5, num_tasks))).astype(np.float32)
        yield before, after


def test_config_round_trip():
    asserts.assert_config_round_trip(
        FAMO, {"learning_rate": 0.01, "weight_decay": 0.0, "min_losses": [0.0, 0.1], "epsilon": 1e-6}
    )
    assert not FAMO.requires_gram and FAMO.needs_losses_after_update
    with pytest.raises(ValueError, match="learning_rate"):
        FAMO(learning_rate=-1.0)
    with pytest.raises(ValueError, match="min_losses"):
        built(3, min_losses=[0.0, 0.0])
    weighting = built(2, min_losses={"t1": 0.5, "t0": 0.25})
    np.testing.assert_allclose(loss_weights(weighting, [1.25, 1.5]), [0.5, 0.5], rtol=1e-6)  # D = (1, 1)


def test_first_weights_are_normalised_inverse_losses():
    losses = np.array([0.5, 2.0, 4.0], np.float32)
    expected = (1 / losses) / np.sum(1 / losses)
    np.testing.assert_allclose(loss_weights(built(3), losses), expected, rtol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_agrees_with_the_equations_over_many_steps(num_tasks):
    ours, reference = built(num_tasks, weight_decay=1e-2), Reference(num_tasks, weight_decay=1e-2)
    for step, (before, after) in enumerate(loss_changes(num_tasks, 30, seed=1)):
        weights = loss_weights(ours, before)
        expected = reference.weights(before.astype(np.float64))
        error = np.abs(weights - expected).max() / expected.max()
        measure("famo_weights_vs_numpy", error)
        assert error <= 1e-5, (step, error)
        ours.after_update(ops.convert_to_tensor(before), ops.convert_to_tensor(after))
        reference.update(before.astype(np.float64), after.astype(np.float64))
        error = np.abs(numpy_of(ours.logits) - reference.xi).max()
        measure("famo_logits_vs_numpy", error)
        assert error <= 2e-5, (step, error)
    assert numpy_of(ours.adam_steps) == 30


def test_task_whose_loss_fell_most_loses_weight():
    weighting = built(3)
    before = np.ones(3, np.float32)
    after = np.array([0.5, 0.9, 0.9], np.float32)
    for _ in range(5):
        weighting.after_update(ops.convert_to_tensor(before), ops.convert_to_tensor(after))
    weights = loss_weights(weighting, before)
    assert weights[0] < weights[1] and np.isclose(weights[1], weights[2], rtol=1e-6), weights


def test_rescaling_a_loss_changes_neither_the_logits_nor_the_direction():
    """log D is shifted by log c: delta, hence the logits, are unchanged, and
    w_t c_t is the same up to a common factor."""
    scales = np.array([1e-3, 1.0, 1e3], np.float32)
    plain, scaled = built(3, epsilon=0.0), built(3, epsilon=0.0)
    for before, after in loss_changes(3, 10, seed=2):
        plain.after_update(ops.convert_to_tensor(before), ops.convert_to_tensor(after))
        scaled.after_update(ops.convert_to_tensor(before * scales), ops.convert_to_tensor(after * scales))
    np.testing.assert_allclose(numpy_of(scaled.logits), numpy_of(plain.logits), atol=2e-6)
    losses = np.array([0.5, 2.0, 3.0], np.float32)
    base = loss_weights(plain, losses)
    direction = loss_weights(scaled, losses * scales) * scales
    np.testing.assert_allclose(direction / direction.sum(), base / base.sum(), rtol=2e-5)


def test_non_finite_loss_change_leaves_the_state():
    weighting = built(2)
    weighting.after_update(ops.convert_to_tensor([1.0, 1.0]), ops.convert_to_tensor([0.5, 0.9]))
    state = [numpy_of(v) for v in weighting.variables]
    weighting.after_update(ops.convert_to_tensor([1.0, 1.0]), ops.convert_to_tensor([np.nan, 0.9]))
    for before, variable in zip(state, weighting.variables, strict=True):
        np.testing.assert_array_equal(numpy_of(variable), before)


def test_degenerate_losses():
    """A zero loss is a solved task: weight 0, the others their normalised
    inverse losses (the authors' 1 / epsilon gave it > 0.999 of the
    weight); every task solved: 0. NaN, infinite, negative or below its
    bound: NaN."""
    weights = loss_weights(built(3), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(weights, [0.0, 2.0 / 3.0, 1.0 / 3.0], rtol=1e-6)
    np.testing.assert_array_equal(loss_weights(built(2), [0.0, 0.0]), [0.0, 0.0])
    for bad in (np.nan, np.inf, -1.0):
        assert np.all(np.isnan(loss_weights(built(3), [bad, 1.0, 2.0]))), bad
    below = built(2, min_losses=[1.0, 0.0])
    assert np.all(np.isnan(loss_weights(below, [0.5, 1.0])))


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_agrees_with_torchjd(num_tasks):
    """torchjd's FAMO (adapted from the authors' code; the same defaults,
    lr 0.025 and weight decay 1e-3): the same losses before and after 30
    updates give the same weights (the gradient of its output with respect
    to the losses) and the same logits."""
    torch = pytest.importorskip("torch")
    scalarization = pytest.importorskip("torchjd.scalarization")
    ours, theirs = built(num_tasks), scalarization.FAMO(num_tasks)
    for step, (before, after) in enumerate(loss_changes(num_tasks, 30, seed=3)):
        values = torch.tensor(before, requires_grad=True)
        theirs(values).backward()
        expected = values.grad.numpy()
        error = np.abs(loss_weights(ours, before) - expected).max() / expected.max()
        measure("famo_weights_vs_torchjd", error)
        assert error <= 1e-5, (step, error)
        ours.after_update(torch.tensor(before), torch.tensor(after))
        theirs.update(torch.tensor(after))
        error = np.abs(numpy_of(ours.logits) - theirs._w.detach().numpy()).max()
        measure("famo_logits_vs_torchjd", error)
        assert error <= 2e-5, (step, error)
