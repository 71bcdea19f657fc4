"""TensorBoard summaries for `keras_mgda.callbacks.TaskTensorBoard`,
written with TensorFlow's summary writer (the one Keras's `TensorBoard`
callback uses), whatever the Keras backend."""

import numpy as np

__all__ = ["Writer"]

CELL = 16  # pixels per matrix entry in the heatmap image


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "TaskTensorBoard writes TensorBoard summaries with TensorFlow's writer: "
            "pip install tensorflow (any Keras backend can stay)."
        ) from error
    return tf


def _layout(task_names):
    """The custom scalars layout: every task's weight on one chart (None
    without the `tensorboard` package, which draws it)."""
    try:
        from tensorboard.plugins.custom_scalar import layout_pb2
        from tensorboard.plugins.custom_scalar import summary as custom_scalar
    except ImportError:
        return None

    chart = layout_pb2.Chart(
        title="task weights", multiline=layout_pb2.MultilineChartContent(tag=[r"task_weights/.*"])
    )
    category = layout_pb2.Category(title="keras_mgda", chart=[chart])
    return custom_scalar.pb(layout_pb2.Layout(category=[category]))


def heatmap_image(cosine):
    """(1, T * CELL, T * CELL, 3) uint8: red for -1, white for 0, blue for
    +1 (matplotlib's RdBu)."""
    from matplotlib import colormaps

    colours = colormaps["RdBu"]((np.asarray(cosine) + 1.0) / 2.0)[..., :3]
    image = np.repeat(np.repeat(colours, CELL, axis=0), CELL, axis=1)
    return (255 * image[None]).astype(np.uint8)


class Writer:
    """A summary writer for one run's task weights and conflict heatmaps.

    Args:
        log_dir: the directory to write to.
        task_names: the tasks, for the layout.
    """

    def __init__(self, log_dir, task_names):
        tf = _tensorflow()
        self._tf = tf
        self._writer = tf.summary.create_file_writer(log_dir)
        layout = _layout(task_names)
        if layout is not None:
            with self._writer.as_default():
                tf.summary.experimental.write_raw_pb(layout.SerializeToString(), step=0)

    def weights(self, weights, step):
        """Each task's weight under `task_weights/<task>`."""
        with self._writer.as_default():
            for task, value in weights.items():
                self._tf.summary.scalar(f"task_weights/{task}", float(value), step=step)

    def conflict(self, cosine, step):
        """The heatmap of the cosines between the tasks' gradients."""
        with self._writer.as_default():
            self._tf.summary.image("task_conflict", heatmap_image(cosine), step=step)

    def close(self):
        self._writer.flush()
        self._writer.close()
