"""The data an exploration averages over, as a list of batches held once.

Exploration visits the same data hundreds of times (every gradient and
every Hessian-vector product is a full-data average), so the batches are
converted to backend tensors once, not re-read from a pipeline each time.
"""

import keras
import numpy as np

from keras_mgda.step import phases

__all__ = ["DEFAULT_BATCH_SIZE", "Data", "as_data"]

# Larger than `fit`'s 32: each batch costs a call per Hessian-vector
# product, and the full-data averages do not depend on the batch size.
DEFAULT_BATCH_SIZE = 1024


class Data:
    """Batches and their sizes.

    Attributes:
        batches: list of `phases.Batch` of backend tensors.
        sizes: the number of examples in each batch.
        count: the number of examples.
        source: `(x, y, batch_size)` to pass to `model.evaluate`.
    """

    def __init__(self, batches, sizes, source):
        self.batches = batches
        self.sizes = sizes
        self.count = int(sum(sizes))
        self.source = source


def _tensor(value):
    return None if value is None else keras.ops.convert_to_tensor(value)


def _batch(data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(data))
    # None is a leaf: map_structure's default (its `none_is_leaf` keyword
    # exists only from Keras 3.12).
    batch = phases.Batch(*keras.tree.map_structure(_tensor, (x, y, sample_weight)))
    size = int(keras.tree.flatten(x)[0].shape[0])
    return batch, size


def as_data(x, y=None, batch_size=None):
    """The exploration's `Data` from arrays or a `tf.data.Dataset`.

    Args:
        x: input arrays (any structure the model takes), or a batched
            `tf.data.Dataset` of `(x, y)` or `(x, y, sample_weight)`.
        y: targets for arrays; None for a dataset.
        batch_size: examples per batch for arrays (default 1024); a
            dataset keeps its own batches.

    Returns:
        A `Data`.
    """
    if hasattr(x, "as_numpy_iterator"):
        if y is not None:
            raise ValueError("Pass y=None with a tf.data.Dataset: its elements carry the targets.")
        pairs = [_batch(element) for element in x.as_numpy_iterator()]
        source = (x, None, None)
    else:
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
        count = int(np.shape(keras.tree.flatten(x)[0])[0])
        pairs = []
        for start in range(0, count, batch_size):
            part = keras.tree.map_structure(lambda a, s=start: None if a is None else a[s:s + batch_size], (x, y))
            pairs.append(_batch(part))
        source = (x, y, batch_size)
    if not pairs:
        raise ValueError("The data to explore on is empty.")
    return Data([b for b, _ in pairs], [s for _, s in pairs], source)
