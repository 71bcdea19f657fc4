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
        done = [bool(np.all(state[2])) for state in ops.states]
        assert done[-1] and not any(done[:-1])  # the loop ran until the last round ended it


def test_kinds_name_the_state_change():
    free = np.array([True, True, False])
    state = (None, free, False, 0.0, False, None)
    assert rounds.round_kind(state, (None, np.array([True, True, True]), False, 1.0, False, None)) == "join"
    assert rounds.round_kind(state, (None, np.array([True, False, False]), False, 1.0, False, None)) == "leave"
    assert rounds.round_kind(state, (None, np.array([True, False, True]), False, 1.0, False, None)) == "swap"
    assert rounds.round_kind(state, (None, free, True, 1.0, True, None)) == "hold"


def test_counts_add_up_to_the_rounds():
    result = rounds.count_rounds(10, 8)
    assert sum(result[kind] for kind in rounds.KINDS) == pytest.approx(result["rounds"], abs=0.02)
    assert 2 <= result["rounds"] <= result["max_rounds"] <= 2 * 10 + 16
    assert result["hold"] >= 2  # the solve ends with two rounds that hold
