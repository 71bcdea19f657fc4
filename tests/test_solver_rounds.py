"""benchmarks/solver_rounds.py: every round of the min-norm solver is
recorded and classified, and the classification matches the state changes
it names."""

import numpy as np
import pytest
from script_modules import load_script

from keras_mgda import solvers

pytestmark = pytest.mark.one_backend

rounds = load_script("benchmarks/solver_rounds.py")


def test_recording_changes_no_result_and_sees_every_round():
    ops = rounds._RecordingOps()
    for gram in rounds.make_grams(12, 6):
        np.testing.assert_array_equal(solvers.min_norm(gram, ops=ops), solvers.min_norm(gram, ops=rounds.numpy_ops))
        done = [bool(np.all(state[4])) for state in ops.states]
        assert done[-1] and not any(done[:-1])  # the loop ran until the last round ended it


def test_kinds_name_the_state_change():
    y, free = np.array([0.5, 0.5, 0.0]), np.array([True, True, False])
    state = (y, None, None, free, False)
    assert rounds.round_kind(state, (y, None, None, np.array([True, True, True]), False)) == "join"
    assert rounds.round_kind(state, (y, None, None, np.array([True, False, False]), False)) == "drop in place"
    cut = np.array([1.0, 0.0, 0.0])
    assert rounds.round_kind(state, (cut, None, None, np.array([True, False, False]), False)) == "cut step"
    assert rounds.round_kind(state, (y + 1e-3, None, None, free, True)) == "settle"


def test_counts_add_up_to_the_rounds():
    result = rounds.count_rounds(10, 8)
    assert sum(result[kind] for kind in rounds.KINDS) == pytest.approx(result["rounds"], abs=0.02)
    assert 1 <= result["rounds"] <= result["max_rounds"] <= 2 * 10 + 16
    assert result["settle"] >= 1  # the solve ends with a settled round
