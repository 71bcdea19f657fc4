"""STCH (Lin et al. 2024): the step follows T mu log sum_t exp(lambda_t h_t / mu),
h_t = log(L_t / n_t + eps) (or L_t / n_t), after a warm-up on sum_t h_t in
which the nadir point n is measured (the authors' multi-task code).

Checked: the config and options; with `log_losses=False` and no warm-up,
T times the gradient of torchjd's STCH(mu, weights=lambda) (torch); the
authors' recipe over epochs (warm-up weights 1/L, the nadir as the mean
loss of the last warm-up epoch, then the gradient of their objective) on a
NumPy reference of their code; the smooth maximum (small mu puts the
weight on the most lagging task, large mu spreads it); invariance to a
common loss scale; degenerate losses.
"""

import numpy as np
import pytest
from keras import ops

from keras_mgda.weighting.stch import STCH

from . import _asserts as asserts
from ._calling import BACKEND
from ._calling import measure
from ._calling import weigh


def built(num_tasks, **options):
    weighting = STCH(**options)
    weighting.build(num_tasks, [f"t{i}" for i in range(num_tasks)])
    return weighting


def loss_weights(weighting, losses):
    losses = np.asarray(losses, np.float32)
    return weigh(weighting, np.eye(len(losses)), losses)


def authors_gradient(losses, nadir, mu):
    """d/dL of T mu log sum exp(log(L / n + 1e-20) / mu) (STCH_MTL's
    `STCH.backward` after the warm-up), in float64."""
    losses, nadir = np.asarray(losses, np.float64), np.asarray(nadir, np.float64)
    h = np.log(losses / nadir + 1e-20)
    soft = np.exp((h - h.max()) / mu)
    soft /= soft.sum()
    return len(losses) * soft / (losses + 1e-20 * nadir)


def test_config_round_trip():
    asserts.assert_config_round_trip(
        STCH,
        {"mu": 0.1, "warmup_epochs": 2, "log_losses": False, "preference": [1.0, 2.0], "epsilon": 1e-12},
    )
    assert not STCH.requires_gram
    for bad in ({"mu": 0.0}, {"warmup_epochs": -1}, {"warmup_epochs": 1.5}, {"epsilon": 0.0}):
        with pytest.raises(ValueError):
            STCH(**bad)
    with pytest.raises(ValueError, match="positive"):
        built(2, preference=[1.0, 0.0])
    with pytest.raises(ValueError, match="preference"):
        built(3, preference=[1.0, 2.0])


def test_authors_recipe_over_epochs():
    """warmup_epochs=2: epochs 0 and 1 weigh 1 / L; the nadir is the mean
    loss of epoch 1; from epoch 2 on, the gradient of the authors'
    objective with that nadir."""
    rng = np.random.default_rng(0)
    weighting = built(3, warmup_epochs=2, mu=0.5)
    measured = []
    for epoch in range(4):
        for _ in range(3):
            losses = np.exp(rng.uniform(-2, 2, 3)).astype(np.float32)
            weights = loss_weights(weighting, losses)
            if epoch < 2:
                np.testing.assert_allclose(weights, 1 / losses.astype(np.float64), rtol=1e-6)
                if epoch == 1:
                    measured.append(losses)
            else:
                expected = authors_gradient(losses, np.mean(measured, axis=0), 0.5)
                error = np.abs(weights - expected).max() / expected.max()
                measure("stch_vs_authors_numpy", error)
                assert error <= 1e-5, (epoch, error)
        weighting.on_epoch_end(epoch)
    np.testing.assert_allclose(np.asarray(ops.convert_to_numpy(weighting.nadir)), np.mean(measured, axis=0), rtol=1e-6)


def test_no_warmup_is_stch_from_the_first_step():
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    weights = loss_weights(built(3, warmup_epochs=0, mu=0.3), losses)
    np.testing.assert_allclose(weights, authors_gradient(losses, np.ones(3), 0.3), rtol=1e-5)


def test_small_mu_is_the_maximum_and_large_mu_spreads():
    losses = np.array([1.0, 3.0, 2.0], np.float32)
    sharp = loss_weights(built(3, warmup_epochs=0, mu=1e-3), losses) * losses
    np.testing.assert_allclose(sharp, [0.0, 3.0, 0.0], atol=1e-5)  # all on max h, times T
    flat = loss_weights(built(3, warmup_epochs=0, mu=1e3, log_losses=False), losses)
    np.testing.assert_allclose(flat, np.ones(3), rtol=3e-3)  # T softmax -> 1


def test_common_loss_scale_leaves_the_direction():
    """log L + log c: the softmax is unchanged and w_t c L_t = w_t L_t."""
    losses = np.array([0.2, 1.0, 5.0], np.float32)
    base = loss_weights(built(3, warmup_epochs=0), losses)
    for factor in (1e-4, 1e4):
        scaled = loss_weights(built(3, warmup_epochs=0), losses * factor)
        np.testing.assert_allclose(scaled * factor, base, rtol=1e-5)


def test_degenerate_losses():
    """A zero loss is a solved task: weight 0 during the warm-up (the
    guard alone gave it 1e20) and after it; the others as without it
    (their softmax share barely moves: the solved task's log loss is -46).
    NaN, infinite or negative: NaN."""
    weights = loss_weights(built(3, warmup_epochs=0), [0.0, 1.0, 2.0])
    assert np.all(np.isfinite(weights)) and weights[0] == 0.0, weights
    warmup = loss_weights(built(3, warmup_epochs=2), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(warmup, [0.0, 1.0, 0.5], rtol=1e-6)
    for bad in (np.nan, np.inf, -1.0):
        assert np.all(np.isnan(loss_weights(built(3, warmup_epochs=0), [bad, 1.0, 2.0]))), bad
    assert np.all(np.isnan(loss_weights(built(3, warmup_epochs=0, log_losses=False), [np.inf, 1.0, 2.0])))


@pytest.mark.skipif(BACKEND != "torch", reason="torchjd is a torch library")
@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0])
def test_agrees_with_torchjd(mu):
    """torchjd's STCH(mu, weights=lambda) is the paper's general form,
    mu log sum exp(lambda L / mu) on the raw losses; ours with
    log_losses=False and no warm-up is T times its gradient (the authors'
    factor T, see `STCH`): compared divided by T."""
    torch = pytest.importorskip("torch")
    scalarization = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(1)
    for num_tasks in (2, 3, 10):
        losses = rng.uniform(0.1, 3.0, num_tasks).astype(np.float32)
        preference = rng.uniform(0.2, 1.0, num_tasks).astype(np.float32)
        values = torch.tensor(losses.astype(np.float64), requires_grad=True)
        theirs = scalarization.STCH(mu, weights=torch.tensor(preference.astype(np.float64)))
        theirs(values).backward()
        expected = values.grad.numpy()
        ours = built(num_tasks, mu=mu, warmup_epochs=0, log_losses=False, preference=preference.tolist())
        weights = loss_weights(ours, losses) / num_tasks
        error = np.abs(weights - expected).max() / expected.max()
        measure("stch_vs_torchjd", error)
        assert error <= 1e-5, (num_tasks, error)
