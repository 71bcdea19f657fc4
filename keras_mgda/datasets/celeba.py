"""CelebA: 40 binary face attributes, one task each, from tensorflow-datasets."""

import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING

from keras_mgda.types import Tensor

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "celeba",
    "preprocess",
]

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes",
    "Bald", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
"""CelebA's 40 binary attributes (the 40 tasks), in the order of `list_attr_celeba.txt`."""

SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def preprocess(
    image: Tensor, attributes: Mapping[str, Tensor], image_size: Sequence[int] = (64, 64)
) -> tuple[Tensor, dict[str, Tensor]]:
    """One CelebA example -> (image, targets), in TensorFlow.

    Args:
        image: uint8 tensor (H, W, 3).
        attributes: dict of the 40 boolean attributes.
        image_size: (height, width) of the output image.

    Returns:
        `(image float32 (height, width, 3) in [0, 1], {attribute: float32
        scalar 0. or 1.})`.
    """
    import tensorflow as tf

    image = tf.image.resize(tf.cast(image, tf.float32), image_size, antialias=True)
    image = tf.clip_by_value(image / 255.0, 0.0, 1.0)
    targets = {name: tf.cast(attributes[name], tf.float32) for name in ATTRIBUTES}
    return image, targets


def celeba(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: Sequence[int] = (64, 64),
    download: bool = True,
) -> "tf.data.Dataset":
    """CelebA from tensorflow-datasets' `celeb_a`, shaped as the authors'
    40-task problem.

    The aligned 178x218 faces are resized to `image_size` (64x64 in the
    paper; the whole image, no crop, as the authors' loader did) and scaled
    to [0, 1]. Each of the 40 attributes is a binary target named after the
    attribute (`"Smiling"`, `"Male"`, ...). Splits are CelebA's official
    partition: 162770 train, 19867 validation, 19962 test images.

    tensorflow-datasets downloads CelebA from Google Drive, which often
    refuses automated downloads; if it does, follow the instructions of the
    `celeb_a` page of the tensorflow-datasets catalog and pass `data_dir`.

    Args:
        split: `"train"`, `"validation"` (or `"val"`) or `"test"`; any
            tensorflow-datasets split string (e.g. `"train[:1%]"`) works too.
        data_dir: tensorflow-datasets data directory, None for its default.
        image_size: (height, width) of the images.
        download: whether tensorflow-datasets may download and prepare the
            data.

    Returns:
        An unbatched `tf.data.Dataset` of `(image, {attribute: label})`:
        images float32 (height, width, 3) in [0, 1], labels float32 scalars
        (1. when the face has the attribute).

    Example:

    ```python
    train = keras_mgda.datasets.celeba("train").shuffle(10_000).batch(256)
    model = keras_mgda.models.celeba_resnet18()
    ```
    """
    import tensorflow as tf

    tfds = _import_tfds("celeba")
    tfds_split = SPLITS.get(split, split)
    dataset = tfds.load("celeb_a", split=tfds_split, data_dir=data_dir, download=download)
    image_size = tuple(int(s) for s in image_size)

    def convert(example):
        return preprocess(example["image"], example["attributes"], image_size)

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _import_tfds(name):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            f"keras_mgda.datasets.{name} reads tensorflow-datasets; install it "
            "with pip install 'keras-mgda[datasets]'."
        ) from error
    return tfds
