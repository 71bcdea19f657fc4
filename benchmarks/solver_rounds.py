"""Where the rounds of `keras_mgda.solvers.min_norm` go.

The solve time of the min-norm solver is its number of active-set rounds
times the cost of one round (a linear solve and a few dozen small ops, so
on every backend the per-op overhead, not the arithmetic, sets the cost).
This script counts the rounds of each solve of its primal-dual method
(`keras_mgda.primal_dual`) by what they did:

- join: tasks whose KKT condition fails join the free set, and none leaves;
- leave: free tasks leave (their weight came out <= 0, or reached 0 along
  a cut step), and none joins;
- swap: some tasks join and others leave in the same round;
- hold: no task changes side (the second of these in a row ends the solve:
  its solve refines the first).

It runs the solver with the NumPy namespace (`numpy_ops`, as the torch
train step does) and reads every round's state through the namespace's
`while_loop`; the rounds are the same on every backend up to rounding.
The Gram matrices are those of `T` gradients in `2 T` dimensions, half
with a shared direction (as in multi-task networks), half in general
position.

Usage:
    python benchmarks/solver_rounds.py --tasks 10 40 100
    python benchmarks/solver_rounds.py --tasks 40 --problems 256 --output out/rounds.jsonl
"""

import argparse
import collections
import os
import sys

import numpy as np

from keras_mgda import solvers
from keras_mgda.backend import numpy_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import write_line  # noqa: E402

KINDS = ("join", "leave", "swap", "hold")


class _RecordingOps:
    """`numpy_ops` whose `while_loop` records the state after each round."""

    def __init__(self):
        self.states = []

    def __getattr__(self, name):
        return getattr(numpy_ops, name)

    def while_loop(self, cond, body, loop_vars, maximum_iterations=None):
        self.states = [tuple(loop_vars)]

        def recording_body(*state):
            self.states.append(tuple(body(*state)))
            return self.states[-1]

        return numpy_ops.while_loop(cond, recording_body, loop_vars, maximum_iterations)


def round_kind(before, after):
    """What one round did, from the method's state before and after it:
    (y, free, done, rounds, held, barred)."""
    free_before, free_after = before[1], after[1]
    joined, left = np.any(free_after & ~free_before), np.any(free_before & ~free_after)
    if joined and left:
        return "swap"
    return "join" if joined else "leave" if left else "hold"


def make_grams(num_tasks, count, seed=0):
    """(count, T, T) float32 Gram matrices, half correlated, half general."""
    rng = np.random.default_rng([seed, num_tasks])
    grams = []
    for index in range(count):
        g = rng.standard_normal((num_tasks, 2 * num_tasks))
        if index % 2 == 0:
            g = rng.standard_normal(2 * num_tasks) + 1.5 * g
        grams.append(g @ g.T)
    return np.stack(grams).astype("float32")


def count_rounds(num_tasks, problems):
    """Mean rounds per solve of each kind, the mean and largest total, and
    the mean support size of the solution."""
    ops = _RecordingOps()
    per_kind, totals, supports = collections.Counter(), [], []
    for gram in make_grams(num_tasks, problems):
        weights = solvers.min_norm(gram, ops=ops)
        kinds = [round_kind(a, b) for a, b in zip(ops.states, ops.states[1:])]
        per_kind.update(kinds)
        totals.append(len(kinds))
        supports.append(int(np.sum(weights > 0)))
    result = {"tasks": num_tasks, "problems": problems}
    result.update({kind: round(per_kind[kind] / problems, 2) for kind in KINDS})
    result.update(
        rounds=round(float(np.mean(totals)), 2), max_rounds=max(totals), support=round(float(np.mean(supports)), 1)
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--output", help="append JSON lines here")
    args = parser.parse_args()
    for num_tasks in args.tasks:
        write_line(count_rounds(num_tasks, args.problems), args.output)


if __name__ == "__main__":
    main()
