"""Cityscapes with the paper's three tasks: semantic segmentation, the
instance proxy task of Kendall et al. (2018) and disparity.

What tensorflow-datasets' `cityscapes` offers, and how this pipeline uses it:

- config `semantic_segmentation`: the left image and the fine `labelIds` map
  (from `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip`);
- config `stereo_disparity`: the disparity map (from
  `disparity_trainvaltest.zip`), which also asks for the right images
  (`rightImg8bit_trainvaltest.zip`), and which tensorflow-datasets decodes
  to 8 bits; this pipeline reads its raw 16-bit PNG instead
  (`tfds.decode.SkipDecoding`), keeping Cityscapes' 1/256-pixel precision;
- no config holds the instance ids. They are in `gtFine_trainvaltest.zip`,
  which the `semantic_segmentation` config already needs in the manual
  download folder; this pipeline reads each image's `*_gtFine_instanceIds.png`
  from there, by image id.

With `source="files"` it reads the same files from the extracted archives
(`leftImg8bit/`, `gtFine/`, `disparity/` under one folder) and needs neither
tensorflow-datasets nor the right images.
"""

import os
import threading
import zipfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from keras_mgda.types import Tensor

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "cityscapes",
    "decode_disparity",
    "instance_offsets",
    "make_targets",
    "train_id_table",
]

# Cityscapes labelId -> trainId (the 19 evaluated classes); 255 elsewhere.
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
    "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
"""The 19 Cityscapes evaluation classes, in the order of the segmentation labels 0-18."""
NUM_CLASSES = 19
IGNORE_LABEL = 255
FIRST_INSTANCE_ID = 1000  # instanceIds >= 1000 are labelId * 1000 + index
SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
TFDS_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}

MANUAL_DOWNLOAD = """\
Cityscapes needs a manual download (registration required):
  1. Register at https://www.cityscapes-dataset.com/login/ and download
     leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip and
     disparity_trainvaltest.zip (and, for source="tfds", also
     rightImg8bit_trainvaltest.zip, which tensorflow-datasets' disparity
     config asks for).
  2a. source="tfds": put the zip files in one folder and pass it as
      manual_dir (tensorflow-datasets' default is
      ~/tensorflow_datasets/downloads/manual).
  2b. source="files": unzip them into one folder (it then holds
      leftImg8bit/, gtFine/ and disparity/) and pass it as data_dir."""


def train_id_table() -> list[int]:
    """The 256-entry labelId -> trainId table (255 for ignored labels), as a
    Python list."""
    table = [IGNORE_LABEL] * 256
    for label, train_id in LABEL_TO_TRAIN_ID.items():
        table[label] = train_id
    return table


def instance_offsets(instance_ids: Tensor) -> Tensor:
    """Per-pixel offset to the centre of the pixel's instance (Kendall et
    al.'s instance proxy task), in TensorFlow.

    Args:
        instance_ids: int tensor (H, W) of Cityscapes instance ids; ids of
            1000 and above are instances (labelId * 1000 + index), smaller
            ids are stuff or crowd regions without an instance.

    Returns:
        float32 tensor (H, W, 3): `(dy, dx, mask)`. For a pixel at (y, x)
        of an instance whose pixels have mean position (cy, cx),
        `dy = cy - y`, `dx = cx - x` (the vector from the pixel to the
        centre, in pixels) and `mask = 1`; elsewhere all three are 0.
    """
    import tensorflow as tf

    instance_ids = tf.cast(instance_ids, tf.int32)
    shape = tf.shape(instance_ids)
    height, width = shape[0], shape[1]
    rows, cols = tf.meshgrid(
        tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij"
    )
    is_instance = instance_ids >= FIRST_INSTANCE_ID
    flat_ids = tf.reshape(tf.where(is_instance, instance_ids, -1), [-1])
    unique_ids, segments = tf.unique(flat_ids)
    count = tf.shape(unique_ids)[0]
    coords = tf.stack([tf.reshape(rows, [-1]), tf.reshape(cols, [-1])], axis=-1)
    centres = tf.math.unsorted_segment_mean(coords, segments, count)
    offsets = tf.gather(centres, segments) - coords
    mask = tf.cast(tf.reshape(is_instance, [-1, 1]), tf.float32)
    targets = tf.concat([offsets * mask, mask], axis=-1)
    return tf.reshape(targets, [height, width, 3])


def decode_disparity(raw: Tensor) -> Tensor:
    """Cityscapes disparity PNG values -> disparity in pixels.

    Args:
        raw: uint16 tensor; 0 marks pixels without a measurement, other
            values p encode the disparity (p - 1) / 256.

    Returns:
        float32 tensor of the same shape: disparity in pixels of the
        full-resolution image, 0 where there is no measurement.
    """
    import tensorflow as tf

    raw = tf.cast(raw, tf.float32)
    return tf.where(raw > 0, (raw - 1.0) / 256.0, tf.zeros_like(raw))


def make_targets(
    image: Tensor, label_ids: Tensor, instance_ids: Tensor, disparity_raw: Tensor, image_size: Sequence[int]
) -> tuple[Tensor, dict[str, Tensor]]:
    """One Cityscapes example at full resolution -> (image, targets) at
    `image_size`, in TensorFlow.

    The targets are computed at the labels' resolution, then sampled at
    `image_size` with nearest-neighbour resizing, as the authors' loader did,
    so instance offsets and disparities stay in pixels of the
    full-resolution image.

    Args:
        image: uint8 tensor (H, W, 3).
        label_ids: int tensor (H, W) or (H, W, 1) of Cityscapes labelIds.
        instance_ids: int tensor (H, W) or (H, W, 1) of instance ids.
        disparity_raw: uint16 tensor (H, W) or (H, W, 1), Cityscapes'
            disparity PNG values.
        image_size: (height, width) of the outputs.

    Returns:
        `(image, {"segmentation", "instance", "disparity"})`: the image
        float32 (h, w, 3) in [0, 1]; segmentation int32 (h, w), trainIds
        0-18 and 255 for ignored pixels; instance float32 (h, w, 3), see
        `instance_offsets`; disparity float32 (h, w, 1), 0 where unknown.
    """
    import tensorflow as tf

    def plane(tensor):
        tensor = tf.convert_to_tensor(tensor)
        if tensor.shape.rank == 3:
            tensor = tensor[..., 0]
        return tensor

    size = [int(image_size[0]), int(image_size[1])]
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, size, antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
    table = tf.constant(train_id_table(), tf.int32)
    segmentation = tf.gather(table, tf.cast(plane(label_ids), tf.int32))
    instance = instance_offsets(plane(instance_ids))
    disparity = decode_disparity(plane(disparity_raw))[..., None]

    def nearest(tensor):
        return tf.image.resize(tensor, size, method="nearest")

    segmentation = tf.cast(nearest(segmentation[..., None])[..., 0], tf.int32)
    targets = {
        "segmentation": segmentation,
        "instance": nearest(instance),
        "disparity": nearest(disparity),
    }
    return image, targets


def cityscapes(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    image_size: Sequence[int] = (256, 512),
    source: str = "tfds",
    download: bool = True,
) -> "tf.data.Dataset":
    """Cityscapes as a `tf.data.Dataset` of the paper's three tasks.

    - `"segmentation"`: the 19 evaluated classes (Cityscapes trainIds),
      255 for pixels to ignore.
    - `"instance"`: Kendall et al.'s proxy for instance segmentation: for
      every pixel of an instance (a car, a person, ...), the offset (dy, dx)
      from the pixel to the mean position of its instance's pixels, in pixels
      of the full-resolution (1024x2048) image; the third channel is 1 on
      instance pixels and 0 elsewhere (where the offsets are 0 and ignored).
      Crowd regions without instance ids are not instances. (The authors'
      code also counted each crowd region as one instance and stored
      pixel - centre; the error is the same either way.)
    - `"disparity"`: disparity in pixels of the full-resolution image,
      0 where Cityscapes has no measurement (ignored by the loss and the
      metric). The authors normalised it by a per-pixel mean and a global
      std instead; our numbers are in pixels.

    Targets are computed at full resolution and sampled at `image_size`
    (256x512 in the paper) by nearest neighbour; images are resized
    bilinearly (antialiased) and scaled to [0, 1]. No augmentation. The test
    split's labels are withheld by Cityscapes; evaluate on `"validation"`.

    Args:
        split: `"train"`, `"validation"` (or `"val"`) or `"test"`.
        data_dir: with `source="tfds"`, tensorflow-datasets' data directory
            (None for its default); with `source="files"`, the folder holding
            the extracted `leftImg8bit/`, `gtFine/` and `disparity/`.
        manual_dir: with `source="tfds"`, the folder with the downloaded zip
            files (None for tensorflow-datasets' default,
            `<data_dir>/downloads/manual`); the instance ids are read from
            its `gtFine_trainvaltest.zip` (or an extracted `gtFine/` there).
        image_size: (height, width) of images and targets.
        source: `"tfds"` (tensorflow-datasets' `cityscapes`, configs
            `semantic_segmentation` and `stereo_disparity`) or `"files"`.
        download: with `source="tfds"`, whether tensorflow-datasets may
            prepare the dataset from the manual download.

    Returns:
        An unbatched `tf.data.Dataset` of `(image, {"segmentation": ...,
        "instance": ..., "disparity": ...})`, shapes as in `make_targets`.

    Raises:
        FileNotFoundError: the data is missing; the message says what to
            download and where to put it.

    Example:

    ```python
    train = keras_mgda.datasets.cityscapes(
        "train", manual_dir="~/cityscapes_zips").shuffle(500).batch(8)
    model = keras_mgda.models.cityscapes_pspnet(input_shape=(256, 512, 3))
    ```
    """
    if split not in SPLITS:
        raise ValueError(f"Cityscapes has splits {sorted(SPLITS)}; received split={split!r}.")
    if source == "files":
        return _from_files(split, data_dir, image_size)
    if source == "tfds":
        return _from_tfds(split, data_dir, manual_dir, image_size, download)
    raise ValueError(f"source must be 'tfds' or 'files'; received {source!r}.")


# Reading from the extracted files -------------------------------------------


def _from_files(split, data_dir, image_size):
    import tensorflow as tf

    if data_dir is None:
        raise ValueError(
            "cityscapes(source='files') needs data_dir, the folder with the "
            "extracted leftImg8bit/, gtFine/ and disparity/.\n" + MANUAL_DOWNLOAD
        )
    root = os.path.expanduser(os.fspath(data_dir))
    folder = SPLITS[split]
    pattern = os.path.join(root, "leftImg8bit", folder, "*", "*_leftImg8bit.png")
    paths = sorted(tf.io.gfile.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"No Cityscapes images match {pattern}.\n" + MANUAL_DOWNLOAD)
    first = paths[0]
    needed = [_sibling(first, root, kind) for kind in ("labelIds", "instanceIds", "disparity")]
    missing = [p for p in needed if not tf.io.gfile.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Cityscapes files missing, e.g. {missing[0]}.\n" + MANUAL_DOWNLOAD
        )
    columns = {
        kind: [_sibling(p, root, kind) for p in paths]
        for kind in ("labelIds", "instanceIds", "disparity")
    }
    dataset = tf.data.Dataset.from_tensor_slices(
        (paths, columns["labelIds"], columns["instanceIds"], columns["disparity"])
    )

    def load(image_path, label_path, instance_path, disparity_path):
        image = tf.io.decode_png(tf.io.read_file(image_path), channels=3)
        labels = tf.io.decode_png(tf.io.read_file(label_path), channels=1)
        instances = tf.io.decode_png(tf.io.read_file(instance_path), channels=1, dtype=tf.uint16)
        disparity = tf.io.decode_png(tf.io.read_file(disparity_path), channels=1, dtype=tf.uint16)
        return make_targets(image, labels, instances, disparity, image_size)

    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)


def _sibling(image_path, root, kind):
    """Path of the label, instance or disparity file of a left image."""
    relative = os.path.relpath(image_path, os.path.join(root, "leftImg8bit"))
    folder, city, name = relative.split(os.sep)[-3:]
    image_id = name[: -len("_leftImg8bit.png")]
    if kind == "disparity":
        return os.path.join(root, "disparity", folder, city, f"{image_id}_disparity.png")
    return os.path.join(root, "gtFine", folder, city, f"{image_id}_gtFine_{kind}.png")


# Reading through tensorflow-datasets ----------------------------------------


class _InstanceArchive:
    """Reads `<image_id>_gtFine_instanceIds.png` from `gtFine_trainvaltest.zip`
    or from an extracted `gtFine/` folder in the manual download folder."""

    def __init__(self, manual_dir):
        self.manual_dir = manual_dir
        self.zip_path = os.path.join(manual_dir, "gtFine_trainvaltest.zip")
        self.folder = os.path.join(manual_dir, "gtFine")
        self._zip = None
        self._lock = threading.Lock()
        if not (os.path.exists(self.zip_path) or os.path.isdir(self.folder)):
            raise FileNotFoundError(
                "Cityscapes' instance ids are not in tensorflow-datasets' "
                "cityscapes; keras_mgda reads them from "
                f"gtFine_trainvaltest.zip (or an extracted gtFine/) in {manual_dir}, "
                "and found neither.\n" + MANUAL_DOWNLOAD
            )

    def member(self, folder, image_id):
        city = image_id.split("_")[0]
        return f"gtFine/{folder}/{city}/{image_id}_gtFine_instanceIds.png"

    def read(self, folder, image_id):
        name = self.member(folder, image_id)
        if os.path.isdir(self.folder):
            with open(os.path.join(self.manual_dir, *name.split("/")), "rb") as handle:
                return handle.read()
        with self._lock:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.zip_path)
            return self._zip.read(name)


def _tfds_load(tfds, name, split, data_dir, manual_dir, download, decoders=None):
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            decoders=decoders,
            shuffle_files=False,
            download_and_prepare_kwargs={"download_config": download_config},
        )
    except (AssertionError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"tensorflow-datasets could not prepare {name}: {error}\n" + MANUAL_DOWNLOAD
        ) from error


def _from_tfds(split, data_dir, manual_dir, image_size, download):
    import tensorflow as tf

    try:
        import tensorflow_datasets as tfds
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "cityscapes(source='tfds') reads tensorflow-datasets; install it "
            "with pip install 'keras-mgda[datasets]', or use source='files'."
        ) from error
    if manual_dir is None:
        base = data_dir or os.path.join("~", "tensorflow_datasets")
        manual_dir = os.path.join(base, "downloads", "manual")
    manual_dir = os.path.expanduser(os.fspath(manual_dir))
    archive = _InstanceArchive(manual_dir)
    tfds_split = TFDS_SPLITS[split]
    folder = SPLITS[split]
    semantic = _tfds_load(
        tfds, "cityscapes/semantic_segmentation", tfds_split, data_dir, manual_dir, download
    )
    disparity = _tfds_load(
        tfds,
        "cityscapes/stereo_disparity",
        tfds_split,
        data_dir,
        manual_dir,
        download,
        decoders={"disparity_map": tfds.decode.SkipDecoding()},
    )
    disparity = disparity.map(lambda ex: {"image_id": ex["image_id"], "disparity_map": ex["disparity_map"]})

    def read_instances(image_id):
        return archive.read(folder, image_id.numpy().decode())

    def load(semantic_example, disparity_example):
        image_id = semantic_example["image_id"]
        same = tf.debugging.assert_equal(
            image_id,
            disparity_example["image_id"],
            message="cityscapes: the two tensorflow-datasets configs list the images in different orders",
        )
        with tf.control_dependencies([same]):
            encoded = tf.py_function(read_instances, [image_id], tf.string)
        instances = tf.io.decode_png(encoded, channels=1, dtype=tf.uint16)
        disparity_raw = tf.io.decode_png(disparity_example["disparity_map"], channels=1, dtype=tf.uint16)
        return make_targets(
            semantic_example["image_left"],
            semantic_example["segmentation_label"],
            instances,
            disparity_raw,
            image_size,
        )

    dataset = tf.data.Dataset.zip((semantic, disparity))
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
