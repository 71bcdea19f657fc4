"""Hypervolume against values computed by hand."""

import itertools

import numpy as np
import pytest

from keras_mgda.pareto import hypervolume
from keras_mgda.pareto import pareto_mask

# NumPy geometry: once, under torch (tests/conftest.py).
pytestmark = pytest.mark.one_backend


def test_two_dimensions_by_hand():
    # Boxes [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4]: 3 + 2*1 + 1*1 = 6.
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    # A dominated point and one beyond the reference add nothing.
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [0, 5]], [4, 4]) == pytest.approx(6.0)
    assert hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]) == pytest.approx(3.0)
    assert hypervolume([[5.0, 5.0]], [4.0, 4.0]) == 0.0


def test_maximize_is_minimizing_the_negatives():
    accuracies = np.array([[0.9, 0.8], [0.85, 0.86]])
    expected = hypervolume(-accuracies, [-0.5, -0.5])
    assert hypervolume(accuracies, [0.5, 0.5], maximize=True) == pytest.approx(expected)
    # By hand: 0.4*0.3 + 0.35*0.06 = 0.141
    assert expected == pytest.approx(0.4 * 0.3 + 0.35 * 0.06)


def _inclusion_exclusion(points, reference):
    """The exact volume of a union of boxes [p, r] by inclusion-exclusion."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            corner = np.max(subset, axis=0)
            total += (-1) ** (size + 1) * np.prod(np.clip(reference - corner, 0, None))
    return total


def test_three_dimensions_by_hand():
    # Boxes up to (4, 4, 4): p = (1, 1, 3) gives 3*3*1 = 9, q = (2, 2, 1)
    # gives 2*2*3 = 12, and they overlap from (2, 2, 3): 2*2*1 = 4.
    assert hypervolume([[1, 1, 3], [2, 2, 1]], [4, 4, 4]) == pytest.approx(17.0)
    points = np.random.default_rng(0).uniform(0, 1, size=(7, 3))
    reference = np.array([1.2, 1.1, 1.3])
    assert hypervolume(points, reference) == pytest.approx(_inclusion_exclusion(points, reference))


def test_monte_carlo_for_four_tasks():
    points = np.random.default_rng(1).uniform(0, 1, size=(5, 4))
    reference = np.ones(4) * 1.1
    exact = _inclusion_exclusion(points, reference)
    estimate = hypervolume(points, reference, samples=200_000, seed=3)
    assert estimate == pytest.approx(exact, rel=0.02)
    assert hypervolume(points, reference, samples=1000, seed=3) == hypervolume(points, reference, samples=1000, seed=3)


def test_pareto_mask():
    points = [[1, 3], [2, 2], [3, 1], [3, 3], [1, 3], [2, 2.5]]
    np.testing.assert_array_equal(pareto_mask(points), [True, True, True, False, True, False])
