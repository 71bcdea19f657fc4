"""benchmarks/solver_pdas.py: the primal-dual active-set variant it
measures solves the min-norm problem where its rounds end, and its two
failures that keep it out of the library are what the script reports."""

import numpy as np
import pytest
from qp_reference import exact_min_norm
from qp_reference import objective
from script_modules import load_script

pytestmark = pytest.mark.one_backend

EPS32 = float(np.finfo("float32").eps)
pdas = load_script("benchmarks/solver_pdas.py")


@pytest.mark.parametrize("settle", [False, True])
def test_variant_reaches_the_exact_optimum_on_general_problems(settle):
    delta = float(np.sqrt(EPS32)) if settle else 16.0 * EPS32
    rng = np.random.default_rng(0)
    for family in ("random", "correlated", "identical"):
        for _ in range(4):
            grad = pdas.make_gradients(family, 12, rng)
            gram = (grad @ grad.T).astype("float32")
            rounds = []
            alpha = np.asarray(pdas.pdas_min_norm(gram, delta=delta, settle=settle, rounds=rounds))
            assert np.all(alpha >= 0) and abs(alpha.sum() - 1) < 1e-5
            gram64 = gram.astype(np.float64)
            best = objective(gram64, exact_min_norm(gram64))
            assert objective(gram64, alpha) - best <= 1e-6 * max(best, EPS32 * gram64.max()), family
            assert len(rounds) < 2 * 12 + 16  # ended by its own test, not the cap


def test_settling_variant_runs_to_the_cap_on_rank_deficient_mixed_scales():
    # The reason the script gives for not adopting it: with a sqrt(eps)
    # proximal term and no line search, the pull never settles here.
    rows = pdas.accuracy_rows([8], problems=4, delta=float(np.sqrt(EPS32)), settle=True)
    mixed = next(row for row in rows if row["family"] == "mixed_scales")
    assert mixed["at_cap"] >= 1 and mixed["rounds_max"] == 2 * 8 + 16
    assert all(row["worst_excess"] <= 1e-6 for row in rows)  # accurate, only slow
