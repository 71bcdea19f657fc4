"""Hypervolume and non-domination, for comparing sets of trade-offs.

The hypervolume of a set of loss vectors with respect to a reference point
r is the volume of the region between the set and r that the set dominates
(the union of the boxes [p, r]); larger is better, and it grows with both
the quality and the spread of the set. All losses are minimised; pass
`maximize=True` for accuracies.

- 2 tasks: exact, a sweep over the points sorted by the first loss,
  O(n log n).
- 3 tasks: exact, slicing along the third loss and summing the 2-D
  hypervolume of each slice, O(n^2 log n): fine for the hundreds of points
  an exploration gives.
- 4 or more: a Monte Carlo estimate with a seeded generator (uniform
  samples in the box spanned by the points and r; the estimate's standard
  error is about volume * sqrt(p (1 - p) / samples) for a dominated
  fraction p).
"""

import numpy as np

__all__ = ["hypervolume", "pareto_mask"]


def pareto_mask(points):
    """(P,) True for the points no other point dominates (every coordinate
    lower or equal and one lower), for minimisation. Equal points are all
    kept."""
    points = np.asarray(points, np.float64)
    less_equal = np.all(points[:, None, :] <= points[None, :, :], axis=-1)
    less = np.any(points[:, None, :] < points[None, :, :], axis=-1)
    dominated = np.any(less_equal & less, axis=0)  # [j, i]: j dominates i
    return ~dominated


def _hypervolume_2d(points, reference):
    order = np.argsort(points[:, 0], kind="stable")
    volume, lowest = 0.0, reference[1]
    for x, y in points[order]:
        if y < lowest:
            volume += (reference[0] - x) * (lowest - y)
            lowest = y
    return volume


def _hypervolume_3d(points, reference):
    order = np.argsort(points[:, 2], kind="stable")
    points = points[order]
    volume = 0.0
    for k in range(len(points)):
        top = points[k + 1, 2] if k + 1 < len(points) else reference[2]
        if top > points[k, 2]:
            volume += _hypervolume_2d(points[: k + 1, :2], reference[:2]) * (top - points[k, 2])
    return volume


def _hypervolume_monte_carlo(points, reference, samples, seed):
    low = points.min(axis=0)
    box = np.prod(reference - low)
    rng = np.random.default_rng(seed)
    dominated, done = 0, 0
    while done < samples:  # in chunks: samples x points booleans at once
        count = min(samples - done, 10_000)
        u = rng.uniform(low, reference, size=(count, len(reference)))
        dominated += int(np.sum(np.any(np.all(points[None] <= u[:, None], axis=-1), axis=1)))
        done += count
    return box * dominated / samples


def hypervolume(points, reference, *, maximize=False, samples=100_000, seed=0):
    """The hypervolume a set of points dominates up to a reference point.

    Args:
        points: (P, T) objective vectors.
        reference: (T,) the reference point, worse than the points in
            every objective (points not strictly better in all of them add
            nothing).
        maximize: True when larger is better (accuracies): the same as the
            hypervolume of `-points` against `-reference`.
        samples: Monte Carlo samples for T >= 4.
        seed: the Monte Carlo generator's seed.

    Returns:
        A float: exact for T <= 3, an estimate for T >= 4.

    Example:

    ```python
    hypervolume([[1.0, 2.0], [2.0, 1.0]], reference=[3.0, 3.0])  # 3.0
    ```
    """
    points = np.atleast_2d(np.asarray(points, np.float64))
    reference = np.asarray(reference, np.float64).ravel()
    if points.shape[-1] != reference.shape[0]:
        raise ValueError(f"points are {points.shape[-1]}-D but the reference is {reference.shape[0]}-D.")
    if maximize:
        points, reference = -points, -reference
    points = points[np.all(points < reference, axis=1)]
    if len(points) == 0:
        return 0.0
    dims = reference.shape[0]
    if dims == 1:
        return float(reference[0] - points[:, 0].min())
    if dims == 2:
        return float(_hypervolume_2d(points, reference))
    if dims == 3:
        return float(_hypervolume_3d(points, reference))
    return float(_hypervolume_monte_carlo(points, reference, int(samples), seed))
