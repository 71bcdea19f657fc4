"""Ready-made multi-task models for the paper's three benchmarks.

Each builder returns an uncompiled `keras_mgda.MGDAModel` (MGDA-UB) or, when
given another `weighting`, a `keras_mgda.MultiTaskModel`.
"""

from keras_mgda.models.celeba import celeba_resnet18
from keras_mgda.models.cityscapes import AdaptiveAveragePooling
from keras_mgda.models.cityscapes import DisparityLoss
from keras_mgda.models.cityscapes import ImageNetCaffePreprocessing
from keras_mgda.models.cityscapes import InstanceOffsetLoss
from keras_mgda.models.cityscapes import cityscapes_losses
from keras_mgda.models.cityscapes import cityscapes_metrics
from keras_mgda.models.cityscapes import cityscapes_pspnet
from keras_mgda.models.multi_mnist import UnscaledDropout
from keras_mgda.models.multi_mnist import multi_mnist_lenet

__all__ = [
    "AdaptiveAveragePooling",
    "celeba_resnet18",
    "cityscapes_losses",
    "cityscapes_metrics",
    "cityscapes_pspnet",
    "DisparityLoss",
    "ImageNetCaffePreprocessing",
    "InstanceOffsetLoss",
    "multi_mnist_lenet",
    "UnscaledDropout",
]
