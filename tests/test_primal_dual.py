"""keras_mgda.primal_dual: the min-norm solve ends on its own, well before
the loop's cap, on the family where the earlier stopping rule did not
(norms from 1e-10 to 1e15 in fewer dimensions than tasks); where its jumps
cycle, the primal rounds that follow end it, exactly; general problems end
in a few rounds. Exactness on every family is tests/test_solvers.py's."""

import numpy as np
import pytest
from script_modules import load_script
from test_solvers import EPS
from test_solvers import TARGET
from test_solvers import kkt_violation
from test_solvers import make_grams
from test_solvers import relative_gap

from keras_mgda import solvers

pytestmark = pytest.mark.one_backend

solver_rounds = load_script("benchmarks/solver_rounds.py")


def _solve_counting(gram):
    ops = solver_rounds._RecordingOps()  # the benchmark's round recorder
    return np.asarray(solvers.min_norm(gram, ops=ops)), len(ops.states) - 1


def _jumps(num_tasks):
    return num_tasks // 4 + 6


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_tasks", [8, 40, 100])
def test_badly_scaled_rank_deficient_problems_end_well_before_the_cap(dtype, num_tasks):
    cap = 2 * num_tasks + 16
    for gram in make_grams("mixed_scales", num_tasks, dtype, 16, seed=3):
        alpha, rounds = _solve_counting(gram)
        assert rounds <= cap // 2  # min_norm's earlier method ran these to the cap
        assert relative_gap(gram, alpha, dtype) <= TARGET[dtype]
        assert np.all(alpha >= 0) and abs(alpha.sum() - 1) <= 4 * num_tasks * EPS[dtype]


def test_primal_rounds_end_a_problem_whose_jumps_cycle():
    # Five tasks, one nearly the difference of two others: the jumps cycle
    # through four free sets (found by tests/test_solver_properties.py).
    g = np.array([
        [11.34732369, -1.96796112, 8.36262575, 4.38346418, 3.22376908, -0.962453],
        [-1.18399591, 1.69352289, -0.53571112, -1.06617315, 2.57742177, 1.52939552],
        [-3.61231605, 1.31801158, -3.48059945, -1.76747609, 0.375973, -0.05160326],
        [-0.69509462, 0.27263527, -1.1123545, -0.30678633, 0.23248454, -0.44762358],
        [12.53131921, -3.66148254, 8.89833507, 5.44963846, 0.64634564, -2.49184903],
    ])
    gram = g @ g.T
    alpha, rounds = _solve_counting(gram)
    assert _jumps(5) < rounds < 2 * 5 + 16
    assert kkt_violation(gram, alpha) <= 1e3 * EPS["float64"]


def test_a_task_that_leaves_in_place_does_not_rejoin_until_the_point_moves():
    # One of these (float32, 8 tasks) rejoins and leaves one task forever
    # without the bar: rounding says both that it should join and that its
    # weight is <= 0.
    rounds = [_solve_counting(gram)[1] for gram in make_grams("mixed_scales", 8, "float32", 16, seed=3)]
    assert _jumps(8) < max(rounds) <= 2 * _jumps(8)


def test_general_problems_end_in_a_few_rounds():
    for family in ("random", "correlated", "identical", "orthogonal"):
        for gram in make_grams(family, 40, "float32", 8):
            _, rounds = _solve_counting(gram)
            assert 2 <= rounds <= _jumps(40), family  # the last two only confirm
