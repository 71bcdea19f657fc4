"""Figures of multi-task results, drawn with matplotlib.

matplotlib is imported when a figure is drawn, not when `keras_mgda` is
imported, so the package imports without it (`pip install
'keras-mgda[plots]'` adds it). Every function takes an `ax` to draw on and
returns the figure.
"""

from keras_mgda.plots.conflict import conflict_heatmap
from keras_mgda.plots.conflict import cosine_matrix
from keras_mgda.plots.profile import accuracy_profile
from keras_mgda.plots.profile import summarize
from keras_mgda.plots.radar import radar
from keras_mgda.plots.weights import task_weights

__all__ = [
    "accuracy_profile",
    "conflict_heatmap",
    "cosine_matrix",
    "radar",
    "summarize",
    "task_weights",
]
