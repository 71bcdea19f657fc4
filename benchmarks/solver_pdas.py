"""A primal-dual active-set polish for the min-norm problem, measured
against `keras_mgda.solvers.min_norm`: rounds, accuracy and solve time.

`min_norm`'s polish is a primal active-set method: every point is feasible,
a step is cut where a weight reaches 0, and a vanishing proximal term
(sqrt(eps)) is iterated until it settles. `solver_rounds.py` shows where
its rounds go: a third drop tasks that joined at weight 0, a third settle.
The variant here (Hintermueller, Ito and Kunisch's primal-dual active set,
in the scaled variables of `keras_mgda.active_set`) skips both: each round
solves the KKT system on the free set (one bordered solve, two right-hand
sides), then frees every bound task whose multiplier is negative and
binds every free task whose weight came out <= 0, all at once, and jumps
to the solution even where it is infeasible. It ends when no task changes
side. `--delta` sets its proximal term in units of eps: 16 gives a
regularised solve in one step; with `--settle` the term is sqrt(eps), as in
`min_norm`, and a round must also leave the proximal pull below rounding
noise.

It is not the library's solver: with the one-step regularised solve the
objective misses the optimum by more than `min_norm` does where the
optimum is 0, and with `min_norm`'s proximal term it has no descent
guarantee (the primal-dual method can cycle where the problem is not an
M-matrix) and still falls short of half the solve time under jit. On the
rank-deficient mixed-scales family both solvers run to the round cap.

Both solvers start from `min_norm`'s best pair and solve with the NumPy
namespace `numpy_ops` (as the torch train step does); `--jax` also times
both under `jax.jit`. Accuracy is the objective above `min_norm`'s,
relative to max(f, eps max M_ii) as in the solver tests; negative means
the variant found a lower objective.

Usage:
    python benchmarks/solver_pdas.py --tasks 8 40 100
    KERAS_BACKEND=jax python benchmarks/solver_pdas.py --tasks 40 --settle --jax
"""

import argparse
import json
import time

import numpy as np

from keras_mgda import numerics as nx
from keras_mgda import solvers
from keras_mgda.backend import numpy_ops

JOIN_NOISE = 16.0  # as in keras_mgda.active_set


class _Scaled:
    """The problem in y = s * w (unit diagonal), as `active_set._Problem`."""

    def __init__(self, gram, delta, ops):
        self.ops, self.delta = ops, delta
        self.eps = nx.eps(nx.float_dtype(gram))
        diag = ops.diagonal(gram, axis1=-2, axis2=-1)
        floor = nx.const(self.eps * self.eps, gram, ops=ops)
        self.scale = ops.sqrt(nx.maximum(diag, floor, ops=ops))
        self.unit = gram / self.scale[..., :, None] / self.scale[..., None, :]
        self.inverse = 1.0 / self.scale

    def free_solution(self, center, free):
        """argmin y^T C y + delta |y - center|^2 on the free set, 0 elsewhere,
        with sum(w) = 1: (C_FF + delta I) y = delta center + lambda v."""
        ops, f = self.ops, self.ops.cast(free, self.unit.dtype)
        system = self.unit * f[..., :, None] * f[..., None, :]
        diagonal = ops.where(free, self.delta, 1.0)  # bound rows: y = 0
        system = system + ops.eye(self.unit.shape[-1], dtype=self.unit.dtype) * diagonal[..., None]
        rhs = ops.concatenate([(self.delta * f * center)[..., None], (f * self.inverse)[..., None]], axis=-1)
        both = ops.solve(system, rhs)
        pulled, unit_sum = both[..., 0], both[..., 1]
        multiplier = (1.0 - ops.sum(self.inverse * pulled, axis=-1, keepdims=True)) / ops.sum(
            self.inverse * unit_sum, axis=-1, keepdims=True
        )
        return f * (pulled + multiplier * unit_sum)

    def reduced(self, y):
        """C y minus the sum constraint's multiplier, and its rounding noise."""
        ops = self.ops
        grad = ops.matmul(self.unit, y[..., None])[..., 0]
        abs_grad = ops.matmul(ops.abs(self.unit), ops.abs(y)[..., None])[..., 0]
        value = ops.sum(y * grad, axis=-1, keepdims=True)
        abs_value = ops.sum(ops.abs(y) * abs_grad, axis=-1, keepdims=True)
        return grad - value * self.inverse, self.eps * (abs_grad + abs_value * self.inverse)


def pdas_polish(gram, weights, *, delta, settle, ops, rounds=None):
    """The primal-dual active-set polish from `weights` (its support is the
    first free set); `rounds`, a list, gets the number of rounds run."""
    problem = _Scaled(gram, delta, ops)
    num_tasks = gram.shape[-1]

    def body(y, free, done):
        z = problem.free_solution(y, free)
        reduced, noise = problem.reduced(z)
        changes = (free & ~(z > 0)) | (~free & (reduced + JOIN_NOISE * noise < 0))
        stable = ~ops.any(changes, axis=-1)
        if settle:  # the proximal pull is below rounding noise too
            stable = stable & ops.all(problem.delta * ops.abs(z - y) <= noise, axis=-1)
        if rounds is not None:
            rounds.append(1)
        keep = done[..., None]
        return ops.where(keep, y, z), ops.where(keep, free, free != changes), done | stable

    y = weights * problem.scale
    state = (y, weights > 0, ~ops.any(weights > 0, axis=-1))
    y, _, _ = ops.while_loop(lambda *s: ~ops.all(s[-1]), body, state, maximum_iterations=2 * num_tasks + 16)
    y = nx.maximum(y, nx.const(0.0, y, ops=ops), ops=ops) / problem.scale
    return y / ops.sum(y, axis=-1, keepdims=True)


def pdas_min_norm(gram, *, delta, settle, ops=numpy_ops, rounds=None):
    """`min_norm`'s scaling and best-pair start, then `pdas_polish`."""
    gram = ops.convert_to_tensor(gram)
    largest = ops.max(ops.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
    gram = gram / nx.power_of_two_near(ops.where(largest > 0, largest, 1.0), ops=ops)[..., None, None]
    pair_mask = ops.ones_like(gram, dtype="bool")
    start = solvers._best_pair(gram, pair_mask, ops)
    return pdas_polish(gram, start, delta=delta, settle=settle, ops=ops, rounds=rounds)


def make_gradients(family, num_tasks, rng):
    """(T, D) gradients of a few of the solver tests' families."""
    if family == "random":
        return rng.standard_normal((num_tasks, num_tasks + 5))
    if family == "correlated":
        return rng.standard_normal(32) + 1.5 * rng.standard_normal((num_tasks, 32))
    if family == "low_rank":  # rank T / 4, integers: the optimum is usually 0
        return rng.integers(-4, 5, size=(num_tasks, max(1, num_tasks // 4))).astype(float)
    if family == "identical":
        return rng.standard_normal((3, 6))[rng.integers(0, 3, size=num_tasks)]
    if family == "mixed_scales":  # rank 10, norms from 1e-10 to 1e15
        return rng.standard_normal((num_tasks, 10)) * 10.0 ** rng.uniform(-10, 15, size=(num_tasks, 1))
    raise ValueError(family)


FAMILIES = ("random", "correlated", "low_rank", "identical", "mixed_scales")


def _excess(gram, alpha, reference, dtype):
    """The objective above the reference's, relative as in the solver tests."""
    gram = np.asarray(gram, dtype=np.float64)
    value, best = (float(a @ gram @ a) for a in (np.asarray(alpha, np.float64), np.asarray(reference, np.float64)))
    return (value - best) / max(best, float(np.finfo(dtype).eps) * float(np.max(np.diag(gram))))


class _CountingOps:
    """`numpy_ops` whose `while_loop` counts the rounds `min_norm` runs."""

    def __init__(self):
        self.rounds = 0

    def __getattr__(self, name):
        return getattr(numpy_ops, name)

    def while_loop(self, cond, body, loop_vars, maximum_iterations=None):
        def counting_body(*state):
            self.rounds += 1
            return body(*state)

        return numpy_ops.while_loop(cond, counting_body, loop_vars, maximum_iterations)


def accuracy_rows(tasks, problems, delta, settle, dtype="float32"):
    """Rounds of both solvers, and the variant's worst objective excess,
    per family and task count."""
    rows = []
    for family in FAMILIES:
        for num_tasks in tasks:
            rng = np.random.default_rng([num_tasks, FAMILIES.index(family)])
            counts, reference_counts, worst = [], [], -np.inf
            for _ in range(problems):
                grad = make_gradients(family, num_tasks, rng)
                gram = (grad @ grad.T).astype(dtype)
                rounds, counting = [], _CountingOps()
                alpha = pdas_min_norm(gram, delta=delta, settle=settle, rounds=rounds)
                reference = solvers.min_norm(gram, ops=counting)
                counts.append(len(rounds))
                reference_counts.append(counting.rounds)
                worst = max(worst, _excess(gram, alpha, reference, dtype))
            rows.append({"family": family, "tasks": num_tasks, "worst_excess": float(f"{worst:.2e}")})
            for name, values in (("pdas", counts), ("min_norm", reference_counts)):
                rows[-1].update({
                    f"{name}_rounds_mean": round(float(np.mean(values)), 2),
                    f"{name}_rounds_max": max(values),
                    f"{name}_at_cap": sum(count >= 2 * num_tasks + 16 for count in values),
                })
    return rows


def _best_time(function, grams, repeats):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function(grams)
        best = min(best, time.perf_counter() - start)
    return best / len(grams) * 1e6


def timing_row(num_tasks, delta, settle, repeats, use_jax):
    """Microseconds per solve of both solvers on the same problems,
    alternating (NumPy, one problem per call; JAX: `lax.map` under jit)."""
    rng = np.random.default_rng(num_tasks)
    grams = []
    for index in range(64):  # half correlated, half in general position
        grad = rng.standard_normal((num_tasks, 2 * num_tasks))
        if index % 2 == 0:
            grad = rng.standard_normal(2 * num_tasks) + 1.5 * grad
        grams.append(grad @ grad.T)
    grams = np.stack(grams).astype("float32")
    pair = {
        "min_norm": lambda gs: [solvers.min_norm(g, ops=numpy_ops) for g in gs],
        "pdas": lambda gs: [pdas_min_norm(g, delta=delta, settle=settle) for g in gs],
    }
    if use_jax:
        import jax
        import keras

        variant = lambda g: pdas_min_norm(g, delta=delta, settle=settle, ops=keras.ops)  # noqa: E731
        for name, solve in (("min_norm", solvers.min_norm), ("pdas", variant)):
            mapped = jax.jit(lambda gs, solve=solve: jax.lax.map(solve, gs))
            mapped(grams).block_until_ready()
            pair[f"{name} (jax.jit)"] = lambda gs, f=mapped: f(gs).block_until_ready()
    times = {name: np.inf for name in pair}
    for _ in range(repeats):  # alternate, keep the best of each
        for name, function in pair.items():
            times[name] = min(times[name], _best_time(function, grams, 1))
    row = {"tasks": num_tasks, **{f"{name}_us": round(value, 1) for name, value in times.items()}}
    row["ratio_numpy"] = round(times["pdas"] / times["min_norm"], 3)
    if use_jax:
        row["ratio_jax"] = round(times["pdas (jax.jit)"] / times["min_norm (jax.jit)"], 3)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 40, 100])
    parser.add_argument("--problems", type=int, default=16, help="problems per family and task count")
    parser.add_argument("--delta", type=float, default=16.0, help="proximal term, in units of eps")
    parser.add_argument("--settle", action="store_true", help="proximal term sqrt(eps), iterated until it settles")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jax", action="store_true", help="also time both under jax.jit (KERAS_BACKEND=jax)")
    parser.add_argument("--output", help="append JSON lines here")
    args = parser.parse_args()
    float32_eps = float(np.finfo("float32").eps)
    delta = float(np.sqrt(float32_eps)) if args.settle else args.delta * float32_eps
    rows = accuracy_rows(args.tasks, args.problems, delta, args.settle)
    rows += [timing_row(t, delta, args.settle, args.repeats, args.jax) for t in args.tasks if t >= 8]
    for row in rows:
        row = {"delta": args.delta if not args.settle else "sqrt(eps)", **row}
        print(json.dumps(row), flush=True)
        if args.output:
            with open(args.output, "a") as stream:
                stream.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
