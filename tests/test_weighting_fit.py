"""Every weighting trains a held-out 3-task model (regression, multi-class,
binary heads) through `fit` on the active backend, logs finite weights,
lowers the losses and round-trips through `.keras` with its state."""

import keras
import numpy as np
import pytest

import keras_mgda as km

TASKS = ("reg", "cls", "bin")


# Listed by hand, not read from the registry under test: a method missing
# from `keras_mgda.weighting.by_name()` must fail `test_every_method_is_listed`,
# not go untested.
METHODS = [
    "AlignedMTL", "CAGrad", "CRMOGM", "ConFIG", "DBMTL", "DTP", "DWA", "DualProj", "ExcessMTL",
    "FAMO", "FairGrad", "GLS", "GradDrop", "GradNorm", "GradVac", "IMTL", "IMTLG", "IMTLL",
    "LBTW", "MGDA", "MoCo", "NashMTL", "PCGrad", "RLW", "SDMGrad", "STCH",
    "ScaleInvariant", "Static", "UPGrad", "Uncertainty", "Uniform",
]
# Stateful options of a method, trained and resumed like the methods.
VARIANTS = {
    "NashMTL(update_weights_every=3)": lambda: km.weighting.NashMTL(update_weights_every=3),
    "DBMTL(mode='parameters')": lambda: km.weighting.DBMTL(mode="parameters"),
}


def _make(name):
    cls = getattr(km.weighting, name)
    if name == "Static":
        return cls({"reg": 0.5, "cls": 0.3, "bin": 0.2})
    if name in ("PCGrad", "RLW", "GradVac", "GradDrop"):  # seeded: two models must draw the same random numbers
        return cls(seed=5)
    if name == "CRMOGM":  # a stateful, random wrapped weighting: its state goes through the wrapper
        return cls(km.weighting.PCGrad(seed=5), alpha=0.8)
    if name == "STCH":  # the nadir point from epoch 0, STCH from epoch 1 on
        return cls(warmup_epochs=1)
    return cls()


def _model(weighting, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,), name="features")
    h = keras.layers.Dense(24, activation="relu", name="trunk")(x)
    z = keras.layers.Dense(16, activation="relu", name="shared")(h)
    reg = keras.layers.Dense(1, name="reg")(z)
    cls = keras.layers.Dense(3, name="cls")(keras.layers.Dense(8, activation="relu")(z))
    binary = keras.layers.Dense(1, name="bin")(z)
    model = km.MultiTaskModel(
        x, {"reg": reg, "cls": cls, "bin": binary}, weighting=weighting
    )
    model.compile(
        optimizer=keras.optimizers.Adam(5e-3),
        loss={
            "reg": "mse",
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "bin": keras.losses.BinaryCrossentropy(from_logits=True),
        },
    )
    return model


def _data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = {
        "reg": (x[:, :1] - 0.5 * x[:, 1:2]).astype("float32"),
        "cls": np.argmax(x[:, 2:5], axis=1).astype("int32"),
        "bin": (x[:, 5:6] + x[:, 6:7] > 0).astype("float32"),
    }
    return x, y


# Every method, and the stateful options of a method, by test id.
MAKERS = {**{name: (lambda name=name: _make(name)) for name in METHODS}, **VARIANTS}


def test_every_method_is_listed():
    registered = sorted(cls.__name__ for cls in km.weighting.by_name().values())
    assert registered == sorted(METHODS)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_method_trains_and_resumes_from_a_checkpoint_bitwise(name, tmp_path):
    """Four epochs of `fit` with `ModelCheckpoint` after every epoch: the
    method logs finite weights, lowers the losses and skips no step; the
    model loaded from the epoch-2 checkpoint is the same method with the
    same config, and (for MGDA and every method with state) training it
    two more epochs ends bitwise where the uninterrupted run did, on every
    backend: weights, the optimizer's slots, the weighting's state and its
    random draws all resume."""
    x, y = _data(128)
    model = _model(MAKERS[name]())
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch_{epoch}.keras"))
    history = model.fit(x, y, epochs=4, batch_size=32, shuffle=False, verbose=0, callbacks=[checkpoint]).history
    for task in TASKS:
        alphas = np.asarray(history[f"{task}_alpha"])
        assert np.all(np.isfinite(alphas)), (task, alphas)
    per_task = sum(np.asarray(history[f"{task}_loss"]) for task in TASKS)
    assert per_task[-1] < per_task[0], per_task
    assert history["skipped_steps"][-1] == 0

    resumed = keras.models.load_model(str(tmp_path / "epoch_2.keras"))
    assert type(resumed.weighting) is type(model.weighting)
    assert resumed.weighting.get_config() == model.weighting.get_config()
    if not model.weighting.variables and name != "MGDA":
        # No state of its own: what resumes (weights, optimizer slots) is
        # the model's, checked once, with MGDA. Skipping the second compile
        # halves the test on TensorFlow and JAX.
        return
    resumed.fit(x, y, epochs=4, initial_epoch=2, batch_size=32, shuffle=False, verbose=0)
    expected, got = model.get_weights(), resumed.get_weights()
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(b, a)
    for a, b in zip(model.weighting.variables, resumed.weighting.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a))


def test_uncertainty_learns_its_log_variances_in_fit():
    model = _model(km.weighting.Uncertainty())
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    log_variances = keras.ops.convert_to_numpy(model.weighting.log_variances)
    assert np.all(np.abs(log_variances) > 1e-3), log_variances
    weights = keras.ops.convert_to_numpy(
        model.weighting(keras.ops.ones((3,), "float32"))
    )
    np.testing.assert_allclose(weights, 0.5 * np.exp(-log_variances), rtol=1e-5)


def test_gradnorm_moves_weight_away_from_the_task_with_the_largest_gradient():
    """The regression loss is scaled by 100 (loss_weights), so its gradient
    dwarfs the others: GradNorm lowers its weight, keeping the sum at T."""
    model = _model(km.weighting.GradNorm(alpha=1.5))
    model.compile(
        optimizer=keras.optimizers.Adam(2e-2),
        loss={
            "reg": "mse",
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "bin": keras.losses.BinaryCrossentropy(from_logits=True),
        },
        loss_weights={"reg": 100.0, "cls": 1.0, "bin": 1.0},
    )
    x, y = _data()
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0).history
    final = np.array([history[f"{task}_alpha"][-1] for task in TASKS])
    np.testing.assert_allclose(final.sum(), 3.0, rtol=1e-4)
    assert final[0] < 0.9 < min(final[1], final[2]), final


def test_dwa_weights_change_after_two_epochs_in_fit():
    model = _model(km.weighting.DWA())
    x, y = _data()
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0).history
    weights = np.array([history[f"{task}_alpha"] for task in TASKS])  # (T, epochs)
    np.testing.assert_allclose(weights[:, :2], 1.0)
    np.testing.assert_allclose(weights.sum(axis=0), 3.0, rtol=1e-5)
    assert np.any(np.abs(weights[:, 2:] - 1.0) > 1e-4)


def test_skipped_step_leaves_the_weighting_state_untouched():
    model = _model(km.weighting.DWA())
    model.on_nonfinite = "skip"
    x, y = _data(32)
    model.train_on_batch(x, y)
    sums = keras.ops.convert_to_numpy(model.weighting.loss_sums).copy()
    assert np.all(sums > 0)
    bad_y = dict(y, reg=np.full_like(y["reg"], np.nan))
    logs = model.train_on_batch(x, bad_y, return_dict=True)
    assert logs["skipped_steps"] == 1
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.weighting.loss_sums), sums
    )
    assert float(keras.ops.convert_to_numpy(model.weighting.step_count)) == 1.0


def test_famo_learns_its_logits_after_every_step():
    model = _model(km.weighting.FAMO())
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert float(keras.ops.convert_to_numpy(model.weighting.adam_steps)) == 12  # 2 epochs of 6 steps
    logits = keras.ops.convert_to_numpy(model.weighting.logits)
    assert np.all(np.isfinite(logits)) and np.abs(logits).max() > 1e-3, logits


def test_stch_measures_its_nadir_point_in_fit():
    """With warmup_epochs=1 the nadir point is the mean task loss of epoch 0
    (Keras logs the same mean: equal batches), set by the epoch hook."""
    model = _model(km.weighting.STCH(warmup_epochs=1))
    x, y = _data()
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0).history
    weighting = model.weighting
    assert float(keras.ops.convert_to_numpy(weighting.epochs_seen)) == 3
    first_epoch = [history[f"{task}_loss"][0] for task in TASKS]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weighting.nadir), first_epoch, rtol=1e-5)


def test_nash_mtl_update_weights_every_through_fit():
    """One step per epoch, so each epoch's logged weights are that step's:
    with update_weights_every=3 the weights are solved at steps 0, 3, 6 and
    reused bit for bit between (max_norm=0: a reused alpha is not re-clipped
    by its update's norm, see `NashMTL`); step 0 is the k = 1 solve (on
    torch k = 1 is solved on the host with NumPy, k = 3 on torch tensors:
    equal to rounding)."""
    x, y = _data(32)
    logged = {}
    for every in (1, 3):
        model = _model(km.weighting.NashMTL(max_norm=0, update_weights_every=every))
        history = model.fit(x, y, epochs=7, batch_size=32, verbose=0).history
        logged[every] = np.array([history[f"{task}_alpha"] for task in TASKS]).T  # (steps, T)
    weights = logged[3]
    np.testing.assert_allclose(weights[0], logged[1][0], rtol=1e-5)
    for step in range(7):
        np.testing.assert_array_equal(weights[step], weights[step - step % 3], err_msg=str(step))
    assert not np.array_equal(weights[0], weights[3]) and not np.array_equal(weights[3], weights[6])
    assert not np.array_equal(logged[1][0], logged[1][1])  # k = 1 solves every step
