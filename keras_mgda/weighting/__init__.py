"""Task weightings: per-task losses (and the Gram matrix of per-task
gradients) in, one weight per task out."""

from keras_mgda.weighting.base import Weighting
from keras_mgda.weighting.base import get
from keras_mgda.weighting.mgda import MGDA
from keras_mgda.weighting.uniform import Uniform
