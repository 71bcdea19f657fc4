"""Task gradients and Gram matrices the weighting tests are run on.

Two kinds:

- `gradients(family, T, seed)`: random float64 gradients, exactly
  representable in float32, in four families (aligned, random, mixed,
  low_rank); `gram_of` rounds their Gram matrix to float32, as the model
  passes it.
- `degenerate(name)`: the degenerate problems of issue 11 (rank-deficient
  Gram matrices with the origin in, on or near the hull of the gradients,
  T from 5 to 16 in a 2-dimensional span; task norms 1e-3 to 1e3 apart;
  duplicated and opposite gradients), built so that M = G G^T is EXACT in
  float32 and in float64: every gradient is a power of two times a vector
  of integers of at most 10 bits over 2^10, so every product and every sum
  of M fits in float32's 24-bit significand. The methods and the exact
  references then solve the same problem, in either precision.
"""

import dataclasses

import numpy as np
import pytest

__all__ = [
    "CASES",
    "DEGENERATE",
    "DEGENERATE_NAMES",
    "EXACT_CASES",
    "EXACT_IDS",
    "exact_params",
    "Problem",
    "degenerate",
    "gradients",
    "gram_of",
    "permuted",
    "random_degenerate",
    "TASKS",
    "unit_scaled",
    "well_conditioned",
]

# The numbers of tasks of the property tests, and their seeds: few distinct
# T, since JAX and TensorFlow compile each weighting once per T.
TASKS = [1, 2, 3, 10, 40]
SEEDS = {1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2], 10: [0, 1], 40: [0]}
CASES = [(t, s) for t in TASKS for s in SEEDS[t]]


def gradients(family, num_tasks, seed):
    """(T, D) float64 task gradients, exactly representable in float32.

    aligned: a shared direction plus noise (few conflicts); random:
    independent directions with norms from 0.1 to 10 (many conflicts),
    linearly independent; mixed: the same with norms from 1e-4 to 1e4;
    low_rank: D = max(1, T // 3) < T for T > 1.
    """
    rng = np.random.default_rng([seed, num_tasks, len(family)])
    if family == "low_rank":
        dim = max(1, num_tasks // 3)
    else:
        dim = 2 * num_tasks + 3
    if family == "aligned":
        g = 1.0 + 0.6 * rng.standard_normal((num_tasks, dim))
    else:
        g = rng.standard_normal((num_tasks, dim))
        spread = np.log(1e4) if family == "mixed" else np.log(10.0)
        g *= np.exp(rng.uniform(-spread, spread, size=(num_tasks, 1)))
    return g.astype(np.float32).astype(np.float64)


def gram_of(g):
    """The float32 Gram matrix (what the model passes), as float64."""
    return (g @ g.T).astype(np.float32).astype(np.float64)


def permuted(gram, perm):
    """M with its tasks in the order `perm` (rows and columns)."""
    return gram[np.ix_(perm, perm)]


def well_conditioned(num_tasks, seed, dim=20):
    """(T, dim) float64 gradients, independent and of norms 0.5 to 2 (the
    torchjd comparisons: answers unique, Gram matrix well conditioned)."""
    rng = np.random.default_rng([seed, num_tasks, 17])
    g = rng.standard_normal((num_tasks, dim))
    g *= rng.uniform(0.5, 2.0, size=(num_tasks, 1)) / np.linalg.norm(g, axis=1, keepdims=True)
    return g


# ------------------------------------------------------------ degenerate

_UNIT = 1024  # entries are integers of |k| <= 1024 over 2^10


@dataclasses.dataclass(frozen=True)
class Problem:
    """A degenerate problem: exact gradients and their exact Gram matrix.

    Attributes:
        name: a short id.
        g: (T, D) float64 gradients (exact in float32).
        gram: (T, T) float64 M = G G^T, exact in float32 and float64.
        rank: the exact rank of G.
        hull: where the origin lies: "inside" (interior of the hull of the
            gradients), "edge" (on its boundary), "near" (just outside,
            angle gap ~1e-3), "outside" (clearly outside), or "full" (full
            rank: outside, and every answer unique).
    """

    name: str
    g: np.ndarray
    gram: np.ndarray
    rank: int
    hull: str

    @property
    def num_tasks(self):
        return self.g.shape[0]

    def __repr__(self):
        return self.name


def _on_circle(angles, rng):
    """Integer directions (k1, k2) / 2^10, lengths 1/2 to 1, at `angles`."""
    lengths = rng.uniform(0.5, 1.0, size=len(angles))
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1) * lengths[:, None]
    return np.round(points * _UNIT) / _UNIT


def _exact(g, scales=None):
    g = np.asarray(g, np.float64)
    if scales is not None:
        g = g * np.ldexp(1.0, np.asarray(scales))[:, None]
    gram = g @ g.T
    # Exactly representable: the float32 rounding changes nothing.
    assert np.array_equal(gram.astype(np.float32).astype(np.float64), gram)
    assert np.array_equal(g.astype(np.float32).astype(np.float64), g)
    return g, gram


def _plane(name, num_tasks, seed, hull, scaled=False):
    rng = np.random.default_rng([seed, num_tasks, len(hull), int(scaled)])
    if hull == "inside":  # directions all around the circle
        angles = np.sort(rng.uniform(0.0, 2 * np.pi, num_tasks))
        angles[:3] = [0.1, 2.2, 4.3]  # at least one triangle around 0
    elif hull == "near":  # within a half-plane but for ~1e-3
        angles = rng.uniform(0.3, np.pi - 0.3, num_tasks)
        angles[:2] = [0.0, np.pi - 2e-3]
    elif hull == "outside":  # within 120 degrees
        angles = rng.uniform(0.0, 2 * np.pi / 3, num_tasks)
    else:
        raise ValueError(hull)
    g = _on_circle(angles, rng)
    if hull == "near":  # pin the two extreme directions exactly
        g[0] = [1.0, 0.0]
        g[1] = [-1.0, 2.0 / _UNIT]
    scales = rng.integers(-10, 11, num_tasks) if scaled else None
    if scaled:
        scales[:2] = [-10, 10]  # norms 2^20 ~ 1e6 apart
    g, gram = _exact(g, scales)
    return Problem(name, g, gram, 2, hull)


def _duplicated(name, num_tasks, seed):
    """Copies of three gradients (one an exact opposite of another): the
    origin on the hull's boundary, identical rows."""
    rng = np.random.default_rng([seed, num_tasks, 3])
    base = _on_circle(np.array([0.4, 1.9]), rng)
    rows = [base[0], base[1], -base[0]]
    g = np.stack([rows[i % 3] for i in range(num_tasks)])
    g, gram = _exact(g)
    return Problem(name, g, gram, 2, "edge")


def _opposite(name, num_tasks, seed, scaled):
    """Pairs g, -2^k g (k >= 0), plus one more direction: the origin on
    the boundary of the hull, rank 2."""
    rng = np.random.default_rng([seed, num_tasks, 4])
    angles = rng.uniform(0.0, np.pi, num_tasks)
    g = _on_circle(angles, rng)
    half = num_tasks // 2
    g[half : 2 * half] = -g[:half]
    scales = rng.integers(-10, 11, num_tasks) if scaled else np.zeros(num_tasks, int)
    g, gram = _exact(g, scales)
    return Problem(name, g, gram, 2, "edge")


def _full_rank(name, num_tasks, seed):
    """T independent gradients in R^T (integers of 9 bits), norms 2^-10 to
    2^10 times 1/2 to 1: full rank (unique answers), badly scaled."""
    rng = np.random.default_rng([seed, num_tasks, 5])
    while True:
        g = rng.integers(-512, 513, size=(num_tasks, num_tasks)) / _UNIT
        if np.linalg.matrix_rank(g) == num_tasks and np.min(np.linalg.svd(g, compute_uv=False)) > 0.05:
            break
    scales = rng.integers(-10, 11, num_tasks)
    scales[:2] = [-10, 10]
    g, gram = _exact(g, scales)
    return Problem(name, g, gram, num_tasks, "full")


def _build():
    problems = []
    for num_tasks, seed in ((5, 0), (8, 1), (10, 2), (16, 3)):
        for hull in ("inside", "near", "outside"):
            problems.append(_plane(f"plane_{hull}_T{num_tasks}", num_tasks, seed, hull))
    for num_tasks, seed in ((5, 4), (10, 5), (16, 6)):
        for hull in ("inside", "near", "outside"):
            problems.append(_plane(f"scaled_{hull}_T{num_tasks}", num_tasks, seed, hull, scaled=True))
    problems.append(_duplicated("duplicated_T6", 6, 7))
    problems.append(_duplicated("duplicated_T10", 10, 8))
    problems.append(_opposite("opposite_T6", 6, 9, scaled=False))
    problems.append(_opposite("opposite_scaled_T10", 10, 10, scaled=True))
    problems.append(_full_rank("scaled_full_T5", 5, 11))
    problems.append(_full_rank("scaled_full_T8", 8, 12))
    return {problem.name: problem for problem in problems}


DEGENERATE = _build()
DEGENERATE_NAMES = list(DEGENERATE)


def degenerate(name):
    """The degenerate problem called `name` (see `DEGENERATE_NAMES`)."""
    return DEGENERATE[name]


def random_degenerate(seed):
    """A random rank-2 problem for the slow sweeps: T from 5 to 16 in a
    plane, the origin inside, just outside or clearly outside the hull,
    norms equal-ish or 1e-3 to 1e3 apart (exact in float32, as above)."""
    rng = np.random.default_rng([seed, 99])
    num_tasks = int(rng.integers(5, 17))
    hull = ("inside", "near", "outside")[seed % 3]
    scaled = bool(rng.integers(2))
    return _plane(f"random{seed}_{hull}_T{num_tasks}", num_tasks, 1000 + seed, hull, scaled=scaled)


# The exactness tests run every degenerate problem through the NumPy path
# (`ops=numpy_ops`) in float32 and float64, and the T = 10 ones through
# keras.ops too: in float32 compiled as the model runs it (T = 10 is a shape
# the property tests compile anyway), in float64 eagerly on four of them.
KERAS32 = [name for name in DEGENERATE_NAMES if DEGENERATE[name].num_tasks == 10]
KERAS64 = ["plane_inside_T10", "scaled_inside_T10", "duplicated_T10", "opposite_scaled_T10"]
EXACT_CASES = (
    [(name, dtype, "numpy") for name in DEGENERATE_NAMES for dtype in ("float32", "float64")]
    + [(name, "float32", "keras") for name in KERAS32]
    + [(name, "float64", "keras") for name in KERAS64]
)
EXACT_IDS = [f"{name}-{dtype}-{path}" for name, dtype, path in EXACT_CASES]

# Keras 3.15's torch backend computes `matmul`, `dot`, `tensordot`,
# `maximum`, `minimum` and `mean` of float64 tensors in float32 (its
# result_type maps float64 to float32 off TensorFlow); the weightings use
# `keras_mgda.numerics` (matvec, dot, where-based maximum) and sums instead,
# which `test_float64_keras_ops_path_is_float64_accurate` checks per method.


def exact_params():
    """`EXACT_CASES` as pytest params."""
    return [
        pytest.param(name, dtype, path, id=case_id)
        for (name, dtype, path), case_id in zip(EXACT_CASES, EXACT_IDS, strict=True)
    ]


def unit_scaled(gram):
    """M / 2^k with max diag in [1/2, 1): an exact rescaling, as the
    methods apply before solving."""
    exponent = np.frexp(np.max(np.diag(gram)))[1]
    return np.ldexp(gram, -exponent)
