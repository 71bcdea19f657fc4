"""`tf.data` pipelines for the paper's three benchmarks: MultiMNIST, CelebA
and Cityscapes, and MultiMNIST as NumPy arrays (`multi_mnist_arrays`) where
TensorFlow is not installed.

TensorFlow and tensorflow-datasets are imported when a dataset is built, not
when `keras_mgda` is imported, so the package imports on every backend.
"""

from keras_mgda.datasets.celeba import ATTRIBUTES as CELEBA_ATTRIBUTES
from keras_mgda.datasets.celeba import celeba
from keras_mgda.datasets.cityscapes import CLASS_NAMES as CITYSCAPES_CLASSES
from keras_mgda.datasets.cityscapes import cityscapes
from keras_mgda.datasets.cityscapes import instance_offsets
from keras_mgda.datasets.multi_mnist import load_digits_arrays
from keras_mgda.datasets.multi_mnist import load_mnist_arrays
from keras_mgda.datasets.multi_mnist import make_pairs
from keras_mgda.datasets.multi_mnist import multi_mnist
from keras_mgda.datasets.multi_mnist import multi_mnist_arrays
from keras_mgda.datasets.multi_mnist import overlay

__all__ = [
    "celeba",
    "CELEBA_ATTRIBUTES",
    "cityscapes",
    "CITYSCAPES_CLASSES",
    "instance_offsets",
    "load_digits_arrays",
    "load_mnist_arrays",
    "make_pairs",
    "multi_mnist",
    "multi_mnist_arrays",
    "overlay",
]
