"""keras_mgda: multi-task learning as multi-objective optimisation in Keras 3.

MGDA-UB (Sener & Koltun, NeurIPS 2018) and other loss-balancing methods as a
drop-in `keras.Model`, on TensorFlow, JAX and PyTorch.
"""

# First, so that an unsupported Keras stops the import with a clear
# ImportError (`_keras.check_version`) instead of training wrongly later.
from keras_mgda import _keras  # noqa: F401
from keras_mgda import callbacks
from keras_mgda import datasets
from keras_mgda import metrics
from keras_mgda import models
from keras_mgda import pareto
from keras_mgda import plots
from keras_mgda import solvers
from keras_mgda import weighting
from keras_mgda.baselines import grid_search
from keras_mgda.baselines import simplex_grid
from keras_mgda.baselines import single_task_model
from keras_mgda.baselines import single_task_models
from keras_mgda.model import MGDAModel
from keras_mgda.model import MultiTaskModel

__all__ = [
    "callbacks",
    "datasets",
    "grid_search",
    "metrics",
    "MGDAModel",
    "models",
    "MultiTaskModel",
    "pareto",
    "plots",
    "simplex_grid",
    "single_task_model",
    "single_task_models",
    "solvers",
    "weighting",
]

__version__ = "0.1.0"
