"""MultiMNIST: two overlapping handwritten digits, one task per digit.

The protocol of Sener & Koltun's code (`multi_mnist_loader.py` in
isl-org/MultiObjectiveOptimization): every image of MNIST is the left digit
of one example; its right digit is another image drawn at random from the
same split. The left digit goes at (0, 0) of a 36x36 canvas, the right digit
at (6, 6), overlapping pixels take the maximum, and the canvas is resized to
28x28 with nearest-neighbour sampling (PIL's convention, which the authors'
`scipy.misc.imresize(..., interp="nearest")` used). Pixels are divided by 255
and normalised with MNIST's mean 0.1307 and standard deviation 0.3081.
"""

import os
from typing import TYPE_CHECKING

import numpy as np

from keras_mgda.types import ArrayLike

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "load_digits_arrays",
    "load_mnist_arrays",
    "make_pairs",
    "multi_mnist",
    "multi_mnist_arrays",
    "normalize",
    "overlay",
    "pair_indices",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
CANVAS = 36
OFFSET = 6
SIZE = 28
SPLITS = ("train", "test")


def _nearest_indices(source, target):
    """Source pixel of each target pixel when resizing `source` -> `target`
    with nearest-neighbour sampling at pixel centres (PIL and
    `tf.image.resize(method="nearest")`)."""
    return np.floor((np.arange(target) + 0.5) * source / target).astype(np.int64)


def overlay(left: ArrayLike, right: ArrayLike) -> np.ndarray:
    """Overlays pairs of 28x28 digits the authors' way.

    Args:
        left: uint8 array (N, 28, 28), the digits placed at (0, 0).
        right: uint8 array (N, 28, 28), the digits placed at (6, 6).

    Returns:
        uint8 array (N, 28, 28): the 36x36 canvases (maximum where the
        digits overlap) resized to 28x28 with nearest-neighbour sampling.

    Example:

    ```python
    images = keras_mgda.datasets.overlay(x[:10], x[10:20])
    ```
    """
    left = np.asarray(left)
    right = np.asarray(right)
    if left.shape != right.shape or left.shape[1:] != (SIZE, SIZE):
        raise ValueError(
            "overlay expects two arrays of 28x28 digits of the same shape; "
            f"received {left.shape} and {right.shape}."
        )
    canvas = np.zeros((left.shape[0], CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :SIZE, :SIZE] = left
    region = canvas[:, OFFSET : OFFSET + SIZE, OFFSET : OFFSET + SIZE]
    np.maximum(region, right, out=region)
    rows = _nearest_indices(CANVAS, SIZE)
    return canvas[:, rows][:, :, rows]


def pair_indices(num_examples: int, seed: int, split: str) -> np.ndarray:
    """The partner (right digit) of every image: uniform draws with
    replacement, as in the authors' code, fixed by `seed` and `split`.

    Args:
        num_examples: number of images in the split.
        seed: int.
        split: `"train"` or `"test"` (the two splits draw different pairs).

    Returns:
        int64 array (num_examples,).
    """
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    return rng.integers(0, num_examples, size=num_examples)


def make_pairs(
    images: ArrayLike, labels: ArrayLike, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MultiMNIST images and labels from single-digit images, in numpy.

    Args:
        images: uint8 array (N, 28, 28).
        labels: int array (N,).
        seed: int, fixes the pairing.
        split: `"train"` or `"test"`; the pairing differs between splits.

    Returns:
        `(canvases, left, right)`: uint8 (N, 28, 28) images and int32 (N,)
        labels of the left and right digit.

    Example:

    ```python
    (x, y), _ = keras.datasets.mnist.load_data()
    images, left, right = keras_mgda.datasets.make_pairs(x, y, seed=0)
    ```
    """
    _check_split(split)
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int32)
    partners = pair_indices(len(images), seed, split)
    canvases = overlay(images, images[partners])
    return canvases, labels, labels[partners]


def normalize(images: ArrayLike) -> np.ndarray:
    """uint8 images (..., 28, 28) -> float32 (..., 28, 28, 1) normalised
    with MNIST's mean and standard deviation."""
    images = np.asarray(images, dtype=np.float32) / 255.0
    return ((images - MNIST_MEAN) / MNIST_STD)[..., None]


def load_mnist_arrays(split: str, source: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The single-digit images and labels of one MNIST split.

    Args:
        split: `"train"` or `"test"`.
        source: path to an `.npz` in the `keras.datasets.mnist` layout
            (`x_train`, `y_train`, `x_test`, `y_test`), `"digits"` for
            scikit-learn's bundled 8x8 digits (see `load_digits_arrays`), or
            None for tensorflow-datasets' `mnist` (downloaded where there is
            internet).

    Returns:
        `(images uint8 (N, 28, 28), labels int32 (N,))`.
    """
    _check_split(split)
    if source is None:
        return _load_tfds_mnist(split)
    if isinstance(source, str) and source == "digits":
        return load_digits_arrays(split)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No MNIST file at {path!r}. Pass the path of an .npz in the "
            "keras.datasets.mnist layout (x_train, y_train, x_test, y_test), "
            "or source=None for tensorflow-datasets' mnist."
        )
    with np.load(path) as data:
        missing = {f"x_{split}", f"y_{split}"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path!r} lacks {sorted(missing)}; expected the "
                "keras.datasets.mnist layout (x_train, y_train, x_test, y_test)."
            )
        images = data[f"x_{split}"]
        labels = data[f"y_{split}"]
    if images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"Expected 28x28 images in {path!r}; found {images.shape}.")
    return images.astype(np.uint8), labels.astype(np.int32)


def _load_tfds_mnist(split):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "multi_mnist(source=None) reads tensorflow-datasets' mnist; "
            "install it (pip install 'keras-mgda[datasets]') or pass "
            "source='path/to/mnist.npz'."
        ) from error
    data = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, as_supervised=True))
    images, labels = data
    return images[..., 0].astype(np.uint8), labels.astype(np.int32)


def load_digits_arrays(split: str, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits, shaped like MNIST.

    `sklearn.datasets.load_digits` ships with scikit-learn (1797 real
    handwritten digits, 8x8, values 0-16; UCI "Optical Recognition of
    Handwritten Digits"). Each digit is upscaled to 20x20 (bilinear) and
    centred in a 28x28 frame with values 0-255, as MNIST's digits are. A
    fixed permutation holds out `test_fraction` of them as the test split.
    A stand-in for MNIST where there is neither internet nor a local copy,
    not a benchmark.

    Args:
        split: `"train"` or `"test"`.
        test_fraction: share of the digits in the test split.

    Returns:
        `(images uint8 (N, 28, 28), labels int32 (N,))`.
    """
    _check_split(split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "The offline MultiMNIST fallback uses scikit-learn's bundled "
            "digits; install scikit-learn (pip install 'keras-mgda[datasets]')."
        ) from error
    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    upscaled = _bilinear_resize(small, 20)
    images = np.zeros((len(small), SIZE, SIZE), dtype=np.uint8)
    images[:, 4:24, 4:24] = np.clip(np.round(upscaled * 255.0), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(1797).permutation(len(images))
    num_test = int(round(test_fraction * len(images)))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    chosen = np.sort(chosen)
    return images[chosen], labels[chosen]


def _bilinear_resize(images, size):
    """(N, h, w) -> (N, size, size), bilinear at pixel centres, edges clamped."""
    height = images.shape[1]
    coords = np.clip((np.arange(size) + 0.5) * height / size - 0.5, 0, height - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, height - 1)
    frac = (coords - low).astype(np.float32)
    rows = images[:, low] * (1 - frac)[None, :, None] + images[:, high] * frac[None, :, None]
    return rows[:, :, low] * (1 - frac)[None, None, :] + rows[:, :, high] * frac[None, None, :]


def multi_mnist_arrays(
    split: str, source: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """MultiMNIST as NumPy arrays, the authors' protocol, without TensorFlow.

    The same examples, in the same order, as `multi_mnist` (its NumPy twin),
    for `fit(x, y)` on the JAX and PyTorch backends where TensorFlow is not
    installed, or wherever a whole split fits in memory (60000 images take
    188 MB in float32).

    Args:
        split: `"train"` or `"test"`.
        source: as for `multi_mnist`: an `.npz` path in the
            `keras.datasets.mnist` layout, None for tensorflow-datasets'
            `mnist`, or `"digits"` for scikit-learn's bundled digits.
        seed: int; the same seed gives the same pairs as `multi_mnist`.

    Returns:
        `(images, {"left": labels, "right": labels})`: float32 images
        (N, 28, 28, 1) normalised with mean 0.1307 and std 0.3081, and
        int32 labels (N,).

    Example:

    ```python
    x, y = keras_mgda.datasets.multi_mnist_arrays("train", source="mnist.npz")
    model = keras_mgda.models.multi_mnist_lenet()
    model.compile(...)
    model.fit(x, y, batch_size=256, shuffle=True, epochs=100)
    ```
    """
    images, labels = load_mnist_arrays(split, source)
    canvases, left, right = make_pairs(images, labels, seed=seed, split=split)
    return normalize(canvases), {"left": left, "right": right}


def multi_mnist(split: str, source: str | os.PathLike[str] | None = None, seed: int = 0) -> "tf.data.Dataset":
    """MultiMNIST as a `tf.data.Dataset`, the authors' protocol.

    Every image of the MNIST split is the left digit of one example, paired
    with a right digit drawn at random (with replacement) from the same
    split; the pairing is fixed by `seed` (and differs between the splits).
    60000 training and 10000 test examples.

    Args:
        split: `"train"` or `"test"`.
        source: path to an `.npz` in the `keras.datasets.mnist` layout, None
            for tensorflow-datasets' `mnist` (downloaded where there is
            internet), or `"digits"` for scikit-learn's bundled 8x8 digits
            shaped like MNIST (an offline stand-in: 1438 train and 359 test
            examples).
        seed: int; the same seed gives the same pairs.

    Returns:
        An unbatched `tf.data.Dataset` of `(image, {"left": label, "right":
        label})`, images float32 (28, 28, 1) normalised with mean 0.1307 and
        std 0.3081, labels int32 scalars.

    Example:

    ```python
    train = keras_mgda.datasets.multi_mnist("train", source="mnist.npz")
    train = train.shuffle(10_000).batch(256)
    model = keras_mgda.models.multi_mnist_lenet()
    ```
    """
    import tensorflow as tf

    images, labels = load_mnist_arrays(split, source)
    canvases, left, right = make_pairs(images, labels, seed=seed, split=split)
    dataset = tf.data.Dataset.from_tensor_slices(
        (canvases[..., None], {"left": left, "right": right})
    )
    mean = tf.constant(MNIST_MEAN, tf.float32)
    std = tf.constant(MNIST_STD, tf.float32)

    def to_float(image, targets):
        image = (tf.cast(image, tf.float32) / 255.0 - mean) / std
        return image, targets

    return dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"MultiMNIST has splits {SPLITS}; received split={split!r}.")
