"""The MultiMNIST LeNet of Sener & Koltun's code (`multi_lenet.py`)."""

import keras

from keras_mgda.models._build import multi_task_model


def multi_mnist_lenet(weighting=None, dropout=0.5, input_shape=(28, 28, 1), name="multi_mnist_lenet", **model_kwargs):
    """The authors' two-task LeNet for MultiMNIST, uncompiled.

    Trunk: conv 10@5x5, max-pool 2, ReLU, conv 20@5x5, channel dropout,
    max-pool 2, ReLU, dense 50 + ReLU: the shared representation Z (layer
    `"shared"`). Each head: dense 50 + ReLU, dropout, dense 10 logits.
    Outputs `"left"` and `"right"`. The dropouts (rate 0.5 by default) are
    the authors' (`Dropout2d` after the second convolution, dropout in the
    heads); `dropout=0` removes them.

    Args:
        weighting: None for MGDA-UB (an `MGDAModel`), or any
            `keras_mgda.weighting.Weighting` (a `MultiTaskModel`).
        dropout: dropout rate of the trunk's channel dropout and the heads'.
        input_shape: shape of one image.
        name: model name.
        **model_kwargs: passed to the model: MGDA options (`normalization`,
            `mode`, ...) when `weighting` is None, `on_nonfinite`, ...

    Returns:
        An uncompiled `keras_mgda.MGDAModel` (or `MultiTaskModel`) with
        outputs `{"left": (B, 10), "right": (B, 10)}` logits.

    Example:

    ```python
    model = keras_mgda.models.multi_mnist_lenet()
    model.compile(
        keras.optimizers.SGD(1e-2, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    model.fit(keras_mgda.datasets.multi_mnist("train").batch(256), epochs=100)
    ```
    """
    images = keras.Input(input_shape, name="image")
    h = keras.layers.Conv2D(10, 5, name="conv1")(images)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(20, 5, name="conv2")(h)
    if dropout:
        h = keras.layers.SpatialDropout2D(dropout, name="conv2_dropout")(h)
    h = keras.layers.MaxPooling2D(2, name="pool2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    z = keras.layers.Dense(50, activation="relu", name="shared")(h)
    outputs = {}
    for task in ("left", "right"):
        t = keras.layers.Dense(50, activation="relu", name=f"{task}_fc1")(z)
        if dropout:
            t = keras.layers.Dropout(dropout, name=f"{task}_dropout")(t)
        outputs[task] = keras.layers.Dense(10, name=task)(t)
    return multi_task_model(images, outputs, weighting=weighting, name=name, **model_kwargs)
