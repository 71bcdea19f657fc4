"""The benchmark pipelines: MultiMNIST on the real MNIST, CelebA and
Cityscapes on mocked tensorflow-datasets and small files made here."""

import importlib
import importlib.util
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from shared_data import MNIST
from shared_data import needs_mnist
from shared_data import require_mnist

tf = pytest.importorskip("tensorflow")

import keras_mgda as km  # noqa: E402

# tf.data and NumPy pipelines, the same under every Keras backend: once,
# under torch (tests/conftest.py).
pytestmark = pytest.mark.one_backend

# The modules, not the functions of the same name that `keras_mgda.datasets` exports.
cityscapes_lib = importlib.import_module("keras_mgda.datasets.cityscapes")
multi_mnist_lib = importlib.import_module("keras_mgda.datasets.multi_mnist")

@pytest.fixture(scope="module")
def mnist():
    with np.load(require_mnist()) as data:
        return {k: data[k] for k in data.files}


def _authors_canvas(left, right):
    """The authors' image, built the way their loader does: a 36x36 canvas,
    maximum where the digits overlap, then PIL's nearest resize to 28x28."""
    Image = pytest.importorskip("PIL.Image")

    canvas = np.zeros((36, 36), dtype=np.uint8)
    for y in range(28):
        for x in range(28):
            canvas[y, x] = left[y, x]
    for y in range(28):
        for x in range(28):
            canvas[y + 6, x + 6] = max(canvas[y + 6, x + 6], right[y, x])
    return np.asarray(Image.fromarray(canvas).resize((28, 28), Image.NEAREST))


# MultiMNIST -------------------------------------------------------------


@needs_mnist
def test_multi_mnist_counts_shapes_and_dtypes():
    train = km.datasets.multi_mnist("train", source=str(MNIST))
    test = km.datasets.multi_mnist("test", source=str(MNIST))
    assert int(train.cardinality()) == 60000
    assert int(test.cardinality()) == 10000
    image_spec, label_spec = train.element_spec
    assert tuple(image_spec.shape) == (28, 28, 1) and image_spec.dtype == tf.float32
    assert set(label_spec) == {"left", "right"}
    assert all(spec.dtype == tf.int32 and tuple(spec.shape) == () for spec in label_spec.values())


@needs_mnist
def test_multi_mnist_images_match_the_authors_canvas(mnist):
    x, y = mnist["x_train"], mnist["y_train"]
    partners = multi_mnist_lib.pair_indices(len(x), seed=3, split="train")
    dataset = km.datasets.multi_mnist("train", source=str(MNIST), seed=3)
    for index, (image, labels) in enumerate(dataset.take(6).as_numpy_iterator()):
        partner = partners[index]
        expected = _authors_canvas(x[index], x[partner])
        np.testing.assert_allclose(
            image[..., 0], (expected / 255.0 - 0.1307) / 0.3081, rtol=0, atol=1e-5
        )
        assert labels["left"] == y[index]
        assert labels["right"] == y[partner]


@needs_mnist
def test_multi_mnist_pairs_are_fixed_by_the_seed(mnist):
    x, y = mnist["x_test"], mnist["y_test"]
    a = km.datasets.make_pairs(x, y, seed=0, split="test")
    b = km.datasets.make_pairs(x, y, seed=0, split="test")
    c = km.datasets.make_pairs(x, y, seed=1, split="test")
    for first, second in zip(a, b):
        np.testing.assert_array_equal(first, second)
    # The left digit is always the image itself; the partner changes with the seed.
    np.testing.assert_array_equal(a[1], y)
    np.testing.assert_array_equal(c[1], y)
    assert np.mean(a[2] != c[2]) > 0.8
    # The first test labels are 7 2 1 0 4 1 4 9 5 9 (shared/data/README.md).
    assert list(a[1][:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # Partners are uniform draws, not a fixed shift: every label shows up on the right.
    assert np.bincount(a[2], minlength=10).min() > 700
    # The dataset's pairs are the numpy pairs.
    dataset = km.datasets.multi_mnist("test", source=str(MNIST), seed=0)
    rights = np.concatenate([batch["right"] for _, batch in dataset.batch(5000).as_numpy_iterator()])
    np.testing.assert_array_equal(rights, a[2])


@pytest.mark.parametrize("split", ["train", "test"])
def test_numpy_path_equals_the_tf_data_path(split):
    pytest.importorskip("sklearn")
    images, labels = km.datasets.multi_mnist_arrays(split, source="digits", seed=2)
    dataset = km.datasets.multi_mnist(split, source="digits", seed=2)
    expected = list(dataset.as_numpy_iterator())
    assert images.shape == (len(expected), 28, 28, 1) and images.dtype == np.float32
    assert set(labels) == {"left", "right"}
    assert all(labels[t].dtype == np.int32 and labels[t].shape == (len(expected),) for t in labels)
    for index, (image, targets) in enumerate(expected):
        np.testing.assert_allclose(images[index], image, rtol=0, atol=1e-6)
        assert labels["left"][index] == targets["left"]
        assert labels["right"][index] == targets["right"]
    # Another seed, other partners: the seed reaches the NumPy path.
    _, other = km.datasets.multi_mnist_arrays(split, source="digits", seed=3)
    np.testing.assert_array_equal(other["left"], labels["left"])
    assert np.mean(other["right"] != labels["right"]) > 0.5


def test_numpy_path_needs_no_tensorflow():
    pytest.importorskip("sklearn")
    import os
    import subprocess
    import sys

    # Outside this process, where TensorFlow is already imported: with
    # `tensorflow` unimportable the NumPy path must still build the data.
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from keras_mgda.datasets import multi_mnist_arrays\n"
        "x, y = multi_mnist_arrays('test', 'digits')\n"
        "print(x.shape, x.dtype, y['left'].dtype)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="numpy")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(359, 28, 28, 1) float32 int32" in done.stdout


def test_train_and_test_draw_different_pairs():
    train = multi_mnist_lib.pair_indices(1000, seed=0, split="train")
    test = multi_mnist_lib.pair_indices(1000, seed=0, split="test")
    assert np.mean(train != test) > 0.9
    np.testing.assert_array_equal(train, multi_mnist_lib.pair_indices(1000, seed=0, split="train"))


def test_overlay_geometry_on_blocks():
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 0, 0] = 200  # top-left corner of the canvas
    right[0, 27, 27] = 90  # bottom-right corner of the right digit: canvas (33, 33)
    left[0, 10, 10] = 50
    right[0, 4, 4] = 120  # canvas (10, 10): overlaps the left digit's pixel
    image = km.datasets.overlay(left, right)[0]
    rows = multi_mnist_lib._nearest_indices(36, 28)
    assert rows[0] == 0 and rows[-1] == 35
    canvas = np.zeros((36, 36), np.uint8)
    canvas[0, 0], canvas[33, 33], canvas[10, 10] = 200, 90, 120
    np.testing.assert_array_equal(image, canvas[rows][:, rows])
    assert image.max() == 200 and 120 in image


def test_multi_mnist_errors(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        km.datasets.multi_mnist("validation", source=str(MNIST))
    with pytest.raises(FileNotFoundError, match="No MNIST file"):
        km.datasets.multi_mnist("train", source=str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="y_train"):
        km.datasets.multi_mnist("train", source=str(tmp_path / "bad.npz"))


def test_digits_fallback_looks_like_mnist():
    pytest.importorskip("sklearn")
    train_x, train_y = km.datasets.load_digits_arrays("train")
    test_x, test_y = km.datasets.load_digits_arrays("test")
    assert train_x.shape == (1438, 28, 28) and test_x.shape == (359, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int32
    assert set(np.unique(train_y)) == set(range(10)) and set(np.unique(test_y)) == set(range(10))
    # Digits sit in the central 20x20 box, with MNIST's 0-255 range.
    assert train_x[:, :4].max() == 0 and train_x[:, 24:].max() == 0
    assert train_x.max() == 255
    # The split is a partition of sklearn's 1797 digits.
    from sklearn.datasets import load_digits

    assert len(train_x) + len(test_x) == len(load_digits().images)
    flat = {row.tobytes() for row in train_x}
    assert sum(row.tobytes() in flat for row in test_x) < 5  # only true duplicates
    dataset = km.datasets.multi_mnist("test", source="digits", seed=0)
    image, labels = next(iter(dataset))
    assert image.shape == (28, 28, 1) and int(dataset.cardinality()) == 359
    assert int(labels["left"]) == test_y[0]


# CelebA ------------------------------------------------------------------


def test_celeba_random_mock_shapes():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        dataset = km.datasets.celeba("train")
        examples = list(dataset.as_numpy_iterator())
    assert len(examples) == 3
    image, targets = examples[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert list(targets) == list(km.datasets.CELEBA_ATTRIBUTES)
    assert len(targets) == 40
    values = np.array([[t[name] for name in targets] for _, t in examples])
    assert set(np.unique(values)) <= {0.0, 1.0}


def test_celeba_targets_follow_the_attribute_names():
    tfds = pytest.importorskip("tensorflow_datasets")
    names = km.datasets.CELEBA_ATTRIBUTES
    on = {"Smiling", "Male", "5_o_Clock_Shadow", "Young"}

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        image = np.full((218, 178, 3), 255, np.uint8)
        image[:109] = 0  # top half black, bottom half white
        example = {
            "image": image,
            "attributes": {n: n in on for n in names},
            "landmarks": {n: 0 for n in self.info.features["landmarks"].keys()},
            "identity": {"Identity_No": 1},
        }
        return tf.data.Dataset.from_tensors(example)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        image, targets = next(km.datasets.celeba("validation", image_size=(32, 16)).as_numpy_iterator())
    assert image.shape == (32, 16, 3)
    assert image[:14].max() < 0.05 and image[18:].min() > 0.95
    assert {n for n, v in targets.items() if v == 1.0} == on


# Cityscapes --------------------------------------------------------------


def _hand_made_scene():
    """A 6x8 scene: two cars (ids 26001, 26002), a crowd of people without
    instance ids (24), road (7) and an unlabelled corner (0)."""
    instance = np.full((6, 8), 7, np.int32)
    instance[0:2, 0:3] = 26001  # centre (0.5, 1.0)
    instance[3:6, 5:8] = 26002
    instance[5, 7] = 7  # the second car is an L: centre is the mean of 8 pixels
    instance[4:6, 0:2] = 24  # crowd
    instance[0, 7] = 0
    labels = np.where(instance >= 1000, instance // 1000, instance).astype(np.uint8)
    return instance, labels


def test_instance_offsets_point_to_the_instance_centre():
    instance, _ = _hand_made_scene()
    targets = km.datasets.instance_offsets(tf.constant(instance)).numpy()
    assert targets.shape == (6, 8, 3)
    rows, cols = np.mgrid[0:6, 0:8]
    for instance_id in (26001, 26002):
        where = instance == instance_id
        centre = np.array([rows[where].mean(), cols[where].mean()])
        pointed = np.stack([rows[where] + targets[..., 0][where], cols[where] + targets[..., 1][where]], -1)
        np.testing.assert_allclose(pointed, np.broadcast_to(centre, pointed.shape), atol=1e-5)
        assert np.all(targets[..., 2][where] == 1.0)
    np.testing.assert_allclose(targets[0, 0, :2], [0.5, 1.0])  # to (0.5, 1.0) from (0, 0)
    not_instance = instance < 1000
    assert np.all(targets[not_instance] == 0.0)
    assert targets[..., 2].sum() == 6 + 8


def test_make_targets_maps_labels_disparity_and_resizes():
    instance, labels = _hand_made_scene()
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 0] = 255
    disparity = np.zeros((6, 8), np.uint16)
    disparity[1, 1] = 257  # (257 - 1) / 256 = 1 pixel
    disparity[2, 3] = 1 + 256 * 40 + 128  # 40.5 pixels
    out_image, targets = cityscapes_lib.make_targets(image, labels[..., None], instance, disparity, (6, 8))
    np.testing.assert_allclose(out_image.numpy()[..., 0], 1.0)
    np.testing.assert_allclose(out_image.numpy()[..., 1], 0.0)
    segmentation = targets["segmentation"].numpy()
    assert segmentation.dtype == np.int32
    assert segmentation[0, 0] == 13  # car
    assert segmentation[2, 2] == 0  # road
    assert segmentation[4, 0] == 11  # person (crowd)
    assert segmentation[0, 7] == 255  # unlabelled: ignored
    disp = targets["disparity"].numpy()[..., 0]
    assert disp[1, 1] == 1.0 and disp[2, 3] == 40.5 and disp[0, 0] == 0.0
    # Half the resolution: every output pixel is a source pixel (nearest).
    _, small = cityscapes_lib.make_targets(image, labels, instance, disparity, (3, 4))
    full = km.datasets.instance_offsets(tf.constant(instance)).numpy()
    rows, cols = [1, 3, 5], [1, 3, 5, 7]  # pixel centres: floor((i + 0.5) * 2)
    # Offsets are sampled, not recomputed: they stay in full-resolution pixels.
    np.testing.assert_array_equal(small["instance"].numpy(), full[rows][:, cols])
    np.testing.assert_array_equal(small["segmentation"].numpy(), segmentation[rows][:, cols])
    np.testing.assert_array_equal(small["disparity"].numpy()[..., 0], disp[rows][:, cols])


def _png(array):
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    return tf.io.encode_png(tf.constant(array)).numpy()


def _scene_files(image_id="aachen_000000_000019"):
    instance, labels = _hand_made_scene()
    image = np.random.default_rng(0).integers(0, 255, (6, 8, 3)).astype(np.uint8)
    disparity = np.zeros((6, 8), np.uint16)
    disparity[2:4] = 1 + 256 * 12
    return image_id, {
        "image": _png(image),
        "labelIds": _png(labels),
        "instanceIds": _png(instance.astype(np.uint16)),
        "disparity": _png(disparity),
    }, instance


def _check_scene(image, targets, instance):
    assert image.shape == (6, 8, 3) and image.dtype == np.float32
    assert targets["segmentation"][0, 0] == 13
    np.testing.assert_allclose(targets["instance"], km.datasets.instance_offsets(tf.constant(instance)).numpy())
    assert targets["disparity"].shape == (6, 8, 1)
    np.testing.assert_allclose(targets["disparity"][2:4], 12.0)
    assert targets["disparity"][0].max() == 0.0


def test_cityscapes_from_extracted_files(tmp_path):
    image_id, files, instance = _scene_files()
    city = image_id.split("_")[0]
    for folder, name, content in [
        ("leftImg8bit", f"{image_id}_leftImg8bit.png", files["image"]),
        ("gtFine", f"{image_id}_gtFine_labelIds.png", files["labelIds"]),
        ("gtFine", f"{image_id}_gtFine_instanceIds.png", files["instanceIds"]),
        ("disparity", f"{image_id}_disparity.png", files["disparity"]),
    ]:
        path = tmp_path / folder / "val" / city / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    dataset = km.datasets.cityscapes("validation", data_dir=str(tmp_path), source="files", image_size=(6, 8))
    examples = list(dataset.as_numpy_iterator())
    assert len(examples) == 1
    _check_scene(*examples[0], instance)
    with pytest.raises(FileNotFoundError, match="cityscapes-dataset.com"):
        km.datasets.cityscapes("train", data_dir=str(tmp_path), source="files")


def test_cityscapes_through_tensorflow_datasets(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    image_id, files, instance = _scene_files("bonn_000001_000019")
    with zipfile.ZipFile(tmp_path / "gtFine_trainvaltest.zip", "w") as archive:
        archive.writestr(f"gtFine/train/bonn/{image_id}_gtFine_instanceIds.png", files["instanceIds"])
    decoded_image = tf.io.decode_png(files["image"]).numpy()
    decoded_labels = tf.io.decode_png(files["labelIds"]).numpy()

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        assert split == "train"
        if self.builder_config.name == "semantic_segmentation":
            example = {"image_id": image_id, "image_left": decoded_image, "segmentation_label": decoded_labels}
        else:
            assert "disparity_map" in (decoders or {}), "the 16-bit PNG must be read raw"
            example = {"image_id": image_id, "image_left": decoded_image, "image_right": decoded_image,
                       "disparity_map": files["disparity"]}
        return tf.data.Dataset.from_tensors(example)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        dataset = km.datasets.cityscapes("train", manual_dir=str(tmp_path), image_size=(6, 8))
        examples = list(dataset.as_numpy_iterator())
    assert len(examples) == 1
    _check_scene(*examples[0], instance)


def test_cityscapes_without_the_instance_archive_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="gtFine_trainvaltest.zip"):
        km.datasets.cityscapes("train", manual_dir=str(tmp_path))
    with pytest.raises(ValueError, match="splits"):
        km.datasets.cityscapes("everything", manual_dir=str(tmp_path))


# The README's main command ------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name):
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_multi_mnist_example_falls_back_to_bundled_digits(monkeypatch, tmp_path, capsys):
    pytest.importorskip("sklearn")
    example = _load_example("multi_mnist")
    monkeypatch.setattr(example, "KERAS_CACHE", str(tmp_path / "no_mnist.npz"))
    monkeypatch.setattr(example, "_can_reach", lambda *a, **k: False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    source, description = example.choose_source(None)
    notice = capsys.readouterr().out
    assert source == "digits" and "scikit-learn" in description
    assert len(notice.strip().splitlines()) == 1 and "not the paper's data" in notice
    assert example.choose_source(str(MNIST))[0] == str(MNIST)


# A subprocess that imports the backend and jit-compiles LeNet: about 30 s
# on JAX on 2 CPU cores, so slow there (the README runs it on TensorFlow).
_slow_on_jax = pytest.mark.slow if keras.backend.backend() == "jax" else (lambda f: f)


@_slow_on_jax
def test_multi_mnist_example_writes_results_and_history(tmp_path):
    pytest.importorskip("sklearn")
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    command = [
        sys.executable, str(EXAMPLES / "multi_mnist.py"), "--data", "digits", "--epochs", "2",
        "--train-examples", "512", "--test-examples", "128", "--batch-size", "256",
        "--output", str(out), "--verbose", "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "mgda" and results["settings"]["epochs"] == 2
    assert set(results["scores"]) == {"left", "right"}
    assert 0.0 <= results["scores"]["left"] <= 1.0
    assert abs(sum(results["last_epoch_task_weights"].values()) - 1.0) < 1e-3
    history = (out / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    assert len(history) == 3  # header + 2 epochs
    for column in ("left_alpha", "right_alpha", "val_left_accuracy", "learning_rate"):
        assert column in header, header
    assert "test accuracy: left" in done.stdout
