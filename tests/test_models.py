"""The ready-made benchmark models build, find their shared representation,
and train; the MultiMNIST LeNet learns real MNIST."""


import keras
import numpy as np
import pytest
from shared_data import MNIST
from shared_data import needs_mnist

import keras_mgda as km

SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BACKEND = keras.backend.backend()
# Tracing a ResNet's train step into a TF graph takes a minute on 2 CPU
# cores, plain Keras included; one eager step takes seconds. On JAX both
# jit and eager steps of ResNet-18 take about a minute here, and the
# MGDA-UB PSPNet step half a minute: those tests are slow there.
EAGER = {"run_eagerly": BACKEND == "tensorflow"}
slow_on_jax = pytest.mark.slow if BACKEND == "jax" else (lambda f: f)


def _weights(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights]


def _changed(before, model):
    pairs = zip(before, model.trainable_weights, strict=True)
    return [not np.allclose(a, keras.ops.convert_to_numpy(b)) for a, b in pairs]


# MultiMNIST LeNet ------------------------------------------------------------


def test_lenet_is_the_authors_network():
    model = km.models.multi_mnist_lenet()
    assert isinstance(model, km.MGDAModel)
    assert model.encoder.layers[-1].name == "shared"  # found automatically
    assert tuple(model.encoder.outputs[0].shape) == (None, 50)
    assert sorted(model.output_names) == ["left", "right"]
    assert model.get_layer("conv1").filters == 10 and model.get_layer("conv1").kernel_size == (5, 5)
    assert model.get_layer("conv2").filters == 20 and model.get_layer("conv2").kernel_size == (5, 5)
    # conv 260 + conv 5020 + fc 320->50 16050 + 2 heads x (50->50 2550 + 50->10 510)
    assert model.count_params() == 260 + 5020 + 16050 + 2 * (2550 + 510)
    logits = model.predict(np.zeros((3, 28, 28, 1), "float32"), verbose=0)
    assert logits["left"].shape == (3, 10) and logits["right"].shape == (3, 10)


def test_lenet_takes_any_weighting_and_mgda_options():
    uniform = km.models.multi_mnist_lenet(weighting=km.weighting.Uniform())
    assert type(uniform) is km.MultiTaskModel
    assert isinstance(uniform.weighting, km.weighting.Uniform)
    mgda = km.models.multi_mnist_lenet(normalization="l2", mode="parameters")
    assert isinstance(mgda, km.MGDAModel)
    assert mgda.weighting.normalization == "l2" and mgda.weighting.mode == "parameters"
    mgda = km.models.multi_mnist_lenet(weighting=km.weighting.MGDA(normalization="none"))
    assert isinstance(mgda, km.MGDAModel) and mgda.weighting.normalization == "none"
    assert "conv2_dropout" not in [layer.name for layer in km.models.multi_mnist_lenet(dropout=0).layers]


def _multi_mnist_arrays(split, limit):
    from keras_mgda.datasets.multi_mnist import load_mnist_arrays
    from keras_mgda.datasets.multi_mnist import make_pairs
    from keras_mgda.datasets.multi_mnist import normalize

    images, labels = load_mnist_arrays(split, str(MNIST))
    canvases, left, right = make_pairs(images[:limit], labels[:limit], seed=0, split=split)
    return normalize(canvases), {"left": left, "right": right}


def _train_lenet(train_examples, batch_size, test_examples=2000):
    keras.utils.set_random_seed(0)
    x, y = _multi_mnist_arrays("train", train_examples)
    x_test, y_test = _multi_mnist_arrays("test", test_examples)
    model = km.models.multi_mnist_lenet(dropout=0)
    model.compile(
        keras.optimizers.Adam(1e-3),
        loss=SPARSE_CE,
        metrics={"left": ["accuracy"], "right": ["accuracy"]},
    )
    history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
    scores = model.evaluate(x_test, y_test, batch_size=500, verbose=0, return_dict=True)
    return history, scores


@needs_mnist
def test_lenet_learns_real_multi_mnist_quickly():
    """192 MGDA-UB steps on 6144 real MultiMNIST images: far above chance
    (10%) on 2000 test images. The full epoch is the slow test below."""
    history, scores = _train_lenet(6144, 32)
    assert scores["left_accuracy"] > 0.6 and scores["right_accuracy"] > 0.6, scores
    alphas = np.array([history.history["left_alpha"][-1], history.history["right_alpha"][-1]])
    assert np.isclose(alphas.sum(), 1.0, atol=1e-3) and np.all(alphas > 0.2)


@pytest.mark.slow
@needs_mnist
def test_lenet_reaches_good_accuracy_in_one_epoch_of_real_multi_mnist():
    """One epoch of the 60000 real MultiMNIST training images (MGDA-UB,
    Adam 1e-3, batch 64, no dropout): both digits above 85% on the 10000
    test images (measured 88-89%: docs/benchmarks_paper.md)."""
    _, scores = _train_lenet(60000, 64, test_examples=10000)
    print("one-epoch accuracy", scores)
    assert scores["left_accuracy"] > 0.85 and scores["right_accuracy"] > 0.85, scores


# The authors' dropout variant ------------------------------------------------


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def test_unscaled_dropout_shares_one_channel_mask_across_the_batch():
    layer = km.models.UnscaledDropout(0.5, shared_axes=(0, 1, 2), seed=1)
    x = np.random.default_rng(0).uniform(1.0, 2.0, (8, 4, 4, 20)).astype("float32")
    out = _numpy(layer(x, training=True))
    kept = out != 0.0
    # One (1, 1, 1, C) mask for every image and position, as the authors' (1, C, 1, 1).
    assert np.all(kept == kept[:1, :1, :1])
    assert 0 < kept[0, 0, 0].sum() < 20
    # Kept units are not scaled up by 1 / (1 - rate).
    np.testing.assert_array_equal(out[kept], x[kept])
    # The identity at inference: not scaled down either.
    np.testing.assert_array_equal(_numpy(layer(x, training=False)), x)
    np.testing.assert_array_equal(_numpy(layer(x)), x)
    # A fresh mask at every call.
    masks = {tuple(_numpy(layer(x, training=True))[0, 0, 0] != 0.0) for _ in range(6)}
    assert len(masks) > 1


def test_unscaled_dropout_masks_each_element_of_a_head():
    layer = km.models.UnscaledDropout(0.5, seed=2)
    out = _numpy(layer(np.ones((256, 50), "float32"), training=True))
    assert set(np.unique(out)) == {0.0, 1.0}  # dropped or kept as is
    assert len({row.tobytes() for row in out}) > 250  # a mask per example
    assert 0.45 < out.mean() < 0.55
    with pytest.raises(ValueError, match="rate"):
        km.models.UnscaledDropout(1.0)


def _repeated_image(count=6):
    image = np.random.default_rng(3).normal(size=(1, 28, 28, 1)).astype("float32")
    return np.repeat(image, count, axis=0)


def test_lenet_authors_dropout_variant_is_the_authors_masks():
    keras.utils.set_random_seed(0)
    authors = km.models.multi_mnist_lenet(weighting=km.weighting.Uniform(), dropout_variant="authors")
    default = km.models.multi_mnist_lenet(weighting=km.weighting.Uniform())
    assert type(default.get_layer("conv2_dropout")) is keras.layers.SpatialDropout2D  # unchanged
    conv2 = authors.get_layer("conv2_dropout")
    assert isinstance(conv2, km.models.UnscaledDropout) and conv2.shared_axes == (0, 1, 2)
    for task in ("left", "right"):
        head = authors.get_layer(f"{task}_dropout")
        assert isinstance(head, km.models.UnscaledDropout) and head.shared_axes == ()
    assert authors.count_params() == default.count_params()
    x = _repeated_image()
    # Identical images give an identical Z in training: the conv2 mask is
    # one for the whole batch (Keras's SpatialDropout2D draws one per image).
    z = _numpy(authors.encoder(x, training=True))
    np.testing.assert_allclose(z, np.broadcast_to(z[:1], z.shape), rtol=1e-5, atol=1e-6)
    z_keras = _numpy(default.encoder(x, training=True))
    assert not np.allclose(z_keras, z_keras[:1])
    # The heads' masks are per example.
    left = _numpy(authors(x, training=True)["left"])
    assert not np.allclose(left, left[:1])
    # At inference: the same network with no dropout at all (no rescaling).
    plain = km.models.multi_mnist_lenet(weighting=km.weighting.Uniform(), dropout=0)
    for target, source in zip(plain.trainable_weights, authors.trainable_weights, strict=True):
        target.assign(_numpy(source))  # a copy: JAX donates the buffers of predict
    expected = plain.predict(x[:2], verbose=0)
    got = authors.predict(x[:2], verbose=0)
    for task in ("left", "right"):
        np.testing.assert_allclose(got[task], expected[task], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dropout_variant"):
        km.models.multi_mnist_lenet(dropout_variant="torch")


# The LeNet's layers and the fan-in of each: PyTorch's default init draws
# kernels and biases uniformly in +-1/sqrt(fan_in).
LENET_FAN_IN = {"conv1": 1 * 5 * 5, "conv2": 10 * 5 * 5, "shared": 320,
                "left_fc1": 50, "left": 50, "right_fc1": 50, "right": 50}


def _torch_layer(name):
    torch = pytest.importorskip("torch")
    if name.startswith("conv"):
        return torch.nn.Conv2d(LENET_FAN_IN[name] // 25, 10 if name == "conv1" else 20, 5)
    return torch.nn.Linear(LENET_FAN_IN[name], 10 if name in ("left", "right") else 50)


def test_lenet_torch_initializer_draws_as_pytorch_does():
    keras.utils.set_random_seed(0)
    model = km.models.multi_mnist_lenet(initializer="torch")
    default = km.models.multi_mnist_lenet()
    for name, fan_in in LENET_FAN_IN.items():
        bound = 1.0 / np.sqrt(fan_in)
        kernel, bias = (_numpy(w) for w in model.get_layer(name).weights)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, name
        # Uniform: std bound/sqrt(3), and draws reach near the bound.
        assert np.abs(kernel).max() > 0.9 * bound, name
        assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.25), name
        assert np.all(bias != 0), name
        # Keras's default is unchanged: Glorot kernels, zero biases.
        assert np.all(_numpy(default.get_layer(name).weights[1]) == 0), name
    with pytest.raises(ValueError, match="initializer"):
        km.models.multi_mnist_lenet(initializer="he")


@pytest.mark.parametrize("name", ["conv2", "shared", "left_fc1"])
def test_lenet_torch_initializer_matches_pytorchs_own_layers(name):
    # The peer: PyTorch's Conv2d and Linear of the same shapes, drawn by
    # torch itself, have the same bound and spread as ours.
    layer = _torch_layer(name)
    keras.utils.set_random_seed(1)
    ours = _numpy(km.models.multi_mnist_lenet(initializer="torch").get_layer(name).weights[0])
    theirs = layer.weight.detach().numpy()
    assert ours.size == theirs.size
    assert np.abs(ours).max() == pytest.approx(np.abs(theirs).max(), rel=0.05)
    assert ours.std() == pytest.approx(theirs.std(), rel=0.1)
    bias_bound = np.abs(layer.bias.detach().numpy()).max()
    assert bias_bound <= 1.0 / np.sqrt(LENET_FAN_IN[name])


@pytest.mark.parametrize("weighting", [None, km.weighting.Uniform()], ids=["mgda_ub", "uniform"])
def test_lenet_authors_dropout_variant_trains_saves_and_loads(tmp_path, weighting):
    keras.utils.set_random_seed(1)
    options = {"normalization": "none"} if weighting is None else {}
    model = km.models.multi_mnist_lenet(weighting=weighting, dropout_variant="authors", **options)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss=SPARSE_CE)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 28, 28, 1)).astype("float32")
    y = {t: rng.integers(0, 10, 64).astype("int32") for t in ("left", "right")}
    seeds = [_numpy(v).copy() for v in model.non_trainable_variables if "seed_generator" in v.path]
    before = _weights(model)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert all(_changed(before, model))
    # The masks' seeds advanced through the train step (JAX's stateless step included).
    after = [_numpy(v) for v in model.non_trainable_variables if "seed_generator" in v.path]
    assert len(after) == 3 and all(not np.array_equal(a, b) for a, b in zip(seeds, after))
    path = tmp_path / "lenet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for name in ("conv2_dropout", "left_dropout", "right_dropout"):
        assert loaded.get_layer(name).get_config() == model.get_layer(name).get_config()
    expected = model.predict(x[:8], verbose=0)
    got = loaded.predict(x[:8], verbose=0)
    for task in ("left", "right"):
        np.testing.assert_allclose(got[task], expected[task], rtol=1e-5, atol=1e-5)


# CelebA ResNet-18 ------------------------------------------------------------


def test_celeba_resnet18_has_the_authors_shape():
    model = km.models.celeba_resnet18()
    assert isinstance(model, km.MGDAModel)
    assert set(model.output_names) == set(km.datasets.CELEBA_ATTRIBUTES)
    assert len(model.outputs) == 40
    assert model.encoder.layers[-1].name == "shared"
    assert tuple(model.encoder.outputs[0].shape) == (None, 2048)  # 2x2x512, as the authors
    assert tuple(model.get_layer("Smiling").output.shape) == (None, 1)
    # ResNet-18 for small images has 11,168,832 parameters; plus 40 heads of 2049.
    assert model.count_params() == 11_168_832 + 40 * 2049 + _bn_stats(model)


def _bn_stats(model):
    """Non-trainable BatchNorm statistics counted by count_params."""
    return sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)


@slow_on_jax
def test_celeba_resnet18_trains_a_step_with_40_tasks():
    keras.utils.set_random_seed(1)
    # width=4 crashes torch 2.13's CPU convolution backward (segfault or hang,
    # plain keras.Model too); 8 is fine.
    model = km.models.celeba_resnet18(input_shape=(32, 32, 3), width=8)
    names = km.datasets.CELEBA_ATTRIBUTES
    model.compile(
        keras.optimizers.Adam(5e-4),
        loss={n: keras.losses.BinaryCrossentropy(from_logits=True) for n in names},
        metrics={n: [km.metrics.BinaryErrorRate()] for n in names[:2]},
        **EAGER,
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 32, 32, 3)).astype("float32")
    y = {n: rng.integers(0, 2, size=(4, 1)).astype("float32") for n in names}
    before = _weights(model)
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    alphas = [history.history[f"{n}_alpha"][0] for n in names]
    assert np.isclose(sum(alphas), 1.0, atol=1e-3)
    assert np.isfinite(history.history["loss"][0])
    assert f"{names[0]}_error" in history.history
    assert all(_changed(before, model)[:3])  # the stem moved


# Cityscapes PSPNet ------------------------------------------------------------


@pytest.mark.one_backend  # the layer graph's shapes; building ResNet-50 costs seconds per backend
def test_cityscapes_pspnet_outputs_at_input_resolution():
    model = km.models.cityscapes_pspnet(input_shape=(64, 96, 3))
    assert isinstance(model, km.MGDAModel)
    assert model.encoder.layers[-1].name == "conv5_block3_out"  # ResNet-50's last block
    assert tuple(model.encoder.outputs[0].shape) == (None, 2, 3, 2048)
    shapes = {name: tuple(t.shape) for name, t in zip(model.output_names, model.outputs)}
    assert shapes == {
        "segmentation": (None, 64, 96, 19),
        "instance": (None, 64, 96, 2),
        "disparity": (None, 64, 96, 1),
    }
    assert model.get_layer("segmentation_pool6").bins == 6


def _tiny_backbone(x):
    h = keras.layers.Conv2D(8, 3, strides=4, padding="same", activation="relu", name="tiny_1")(x)
    return keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="tiny_2")(h)


def _cityscapes_batch(height=32, width=48, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch, height, width, 3)).astype("float32")
    segmentation = rng.integers(0, 19, (batch, height, width)).astype("int32")
    segmentation[:, :3] = 255
    instance = np.zeros((batch, height, width, 3), "float32")
    instance[:, 4:12, 8:20] = [2.0, -3.0, 1.0]
    disparity = rng.uniform(1, 40, (batch, height, width, 1)).astype("float32")
    disparity[:, -4:] = 0.0
    return x, {"segmentation": segmentation, "instance": instance, "disparity": disparity}


def _compiled_tiny_pspnet(**kwargs):
    model = km.models.cityscapes_pspnet(
        input_shape=(32, 48, 3), backbone=_tiny_backbone, pool_scales=(1, 2), decoder_channels=8, **kwargs
    )
    model.compile(
        keras.optimizers.Adam(5e-4),
        loss=km.models.cityscapes_losses(),
        metrics=km.models.cityscapes_metrics(),
        **EAGER,
    )
    return model


@slow_on_jax  # about 35 s of jit compilation on 2 CPU cores; the save/load test trains one on JAX
def test_cityscapes_pspnet_trains_a_step_and_reports_the_papers_metrics():
    keras.utils.set_random_seed(2)
    model = _compiled_tiny_pspnet()
    assert model.encoder.layers[-1].name == "tiny_2"
    x, y = _cityscapes_batch()
    before = _weights(model)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    for key in ("segmentation_mean_iou", "instance_instance_error", "disparity_disparity_error"):
        assert np.isfinite(logs[key]), key
    assert np.isclose(sum(logs[f"{t}_alpha"] for t in ("segmentation", "instance", "disparity")), 1.0, atol=1e-3)
    assert all(_changed(before, model)[:2])
    assert 0.0 <= logs["segmentation_mean_iou"] <= 1.0


def test_cityscapes_pspnet_saves_and_loads(tmp_path):
    model = _compiled_tiny_pspnet(weighting=km.weighting.Uniform())
    x, y = _cityscapes_batch()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    path = tmp_path / "pspnet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    expected = model.predict(x, verbose=0)
    got = loaded.predict(x, verbose=0)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)
    assert isinstance(loaded.weighting, km.weighting.Uniform)


def test_adaptive_pooling_uses_pytorch_bins():
    x = np.arange(2 * 5 * 7 * 3, dtype="float32").reshape(2, 5, 7, 3)
    out = keras.ops.convert_to_numpy(km.models.AdaptiveAveragePooling(3)(x))
    assert out.shape == (2, 3, 3, 3)
    # PyTorch's rule: bin i covers [floor(i n / 3), ceil((i + 1) n / 3)).
    rows = [(0, 2), (1, 4), (3, 5)]
    cols = [(0, 3), (2, 5), (4, 7)]
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(cols):
            np.testing.assert_allclose(out[:, i, j], x[:, top:bottom, left:right].mean(axis=(1, 2)), rtol=1e-6)


def test_imagenet_preprocessing_matches_keras_applications():
    images = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(km.models.ImageNetCaffePreprocessing()(images))
    reference = keras.applications.resnet50.preprocess_input(images * 255.0)
    np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(reference), rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_cityscapes_pspnet_with_resnet50_trains_a_step():
    keras.utils.set_random_seed(3)
    model = km.models.cityscapes_pspnet(input_shape=(64, 64, 3), pool_scales=(1, 2), decoder_channels=16)
    model.compile(
        keras.optimizers.Adam(5e-4), loss=km.models.cityscapes_losses(), metrics=km.models.cityscapes_metrics()
    )
    x, y = _cityscapes_batch(64, 64)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
