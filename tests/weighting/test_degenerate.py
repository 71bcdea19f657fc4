"""Every weighting on the degenerate problems: one task, a zero gradient,
every gradient zero, a zero loss with a nonzero gradient, identical and
opposite gradients, one task 1e8 larger, rank-deficient gradients, tiny
gradients. Over three steps (stateful methods see their state move; an
epoch ends after each step; an `AfterUpdateHook` sees the losses fall),
the weights stay finite and the shared and head updates within the
method's documented bound (`keras_mgda.weighting._bounds.BOUNDS`, the
table in docs/guide/reliability.md).

Pure maths on small matrices: one backend (torch's keras.ops, the
fastest); the per-method modules check the compiled paths.
"""

import keras
import pytest

from keras_mgda import weighting as weighting_lib
from keras_mgda.weighting import _bounds

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="pure maths: run on one backend")

FAMILIES = _bounds.families()
TOLERANCE = 1e-5  # float32 rounding of the measured lengths


def test_every_method_has_a_bound():
    assert sorted(_bounds.BOUNDS) == sorted(weighting_lib.by_name())


@pytest.mark.parametrize("family", _bounds.FAMILIES)
@pytest.mark.parametrize("name", sorted(_bounds.BOUNDS))
def test_update_is_finite_and_bounded(name, family):
    g, losses = FAMILIES[family]
    reach = _bounds.reach(name, g, losses)
    assert reach.finite, reach
    assert reach.shared <= reach.shared_bound * (1 + TOLERANCE), reach
    assert reach.heads <= reach.heads_bound * (1 + TOLERANCE), reach


def test_without_its_cap_nash_mtl_exceeds_the_bound():
    """The bound is not vacuous: without its cap Nash-MTL's heads
    ("scaled") reach hundreds of times their gradient on opposite
    gradients, against the documented 10."""
    g, losses = FAMILIES["opposite"]
    capped = _bounds.reach("nashmtl", g, losses)
    uncapped = _bounds.reach("nashmtl", g, losses, weight_cap=None)
    assert capped.heads <= 10.0 * (1 + TOLERANCE) < 100.0 < uncapped.heads, (capped, uncapped)
