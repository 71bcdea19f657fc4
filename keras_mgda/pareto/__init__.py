"""Continuous Pareto exploration (Ma, Du & Matusik, ICML 2020).

- `explore`: from a trained multi-task model, trace its Pareto set by
  solving (H + damping I) v = J^T beta with MINRES on exact Hessian-vector
  products, step by step, each step checked to lower the chosen
  combination of the losses; returns a `ParetoFront`.
- `stationarity_of`: how far a model is from Pareto stationarity, as
  `explore` checks its start.
- `ParetoFront`: the points, their losses, metrics and weights; `restore`,
  `interpolate`, `pareto_mask`, `plot`, `save` / `load`.
- `minres` (in `keras.ops`, jit-able) and `scipy_minres` (SciPy on the
  host): the two linear solvers.
- `hypervolume`, `pareto_mask`: comparing sets of trade-offs.
"""

from keras_mgda.pareto.explore import DEFAULT_SOLVER
from keras_mgda.pareto.explore import SOLVERS
from keras_mgda.pareto.explore import START_STATIONARITY_WARNING
from keras_mgda.pareto.explore import explore
from keras_mgda.pareto.explore import stationarity_of
from keras_mgda.pareto.front import ParetoFront
from keras_mgda.pareto.hypervolume import hypervolume
from keras_mgda.pareto.hypervolume import pareto_mask
from keras_mgda.pareto.minres import minres
from keras_mgda.pareto.plot import plot_front
from keras_mgda.pareto.scipy_minres import scipy_minres

__all__ = [
    "DEFAULT_SOLVER",
    "ParetoFront",
    "SOLVERS",
    "START_STATIONARITY_WARNING",
    "explore",
    "hypervolume",
    "minres",
    "pareto_mask",
    "plot_front",
    "scipy_minres",
    "stationarity_of",
]
