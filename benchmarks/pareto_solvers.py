"""Wall time of the two MINRES paths of `keras_mgda.pareto.explore`, side
by side: MINRES in `keras.ops` (`solver="keras"`: one compiled solve on
JAX, an eager loop around compiled Hessian-vector products elsewhere)
against SciPy's MINRES on the host (`solver="scipy"`: a host round trip
per iteration, as in Ma et al.'s code).

The MultiMNIST LeNet (`keras_mgda.models.multi_mnist_lenet`, 31k weights),
briefly trained with MGDA-UB on synthetic MultiMNIST-shaped data, then for
each solver in turn (alternating, best of `--repeats`):

- one solve of (H + 0.1 I) v = J^T e_1 at the trained point with exactly
  `--iters` iterations (tolerance 0, so both run the same number of
  Hessian-vector products): ms per solve and per iteration;
- one direction of `explore` (`--steps` steps, the authors' settings:
  damping 0.1, at most 50 iterations, tolerance 1e-5): seconds per
  direction, with the iterations each solver actually ran.

The backend comes from KERAS_BACKEND. These machines are noisy: compare
numbers from one run, never assert a time in a test.

Usage:
    KERAS_BACKEND=torch python benchmarks/pareto_solvers.py
    KERAS_BACKEND=jax python benchmarks/pareto_solvers.py --examples 2048 --repeats 5
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_mgda as km
from keras_mgda import backend as mtl_backend
from keras_mgda.backend import numpy_ops


def _model_and_data(examples, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, 28, 28, 1)).astype("float32")
    y = {task: rng.integers(0, 10, examples).astype("int32") for task in ("left", "right")}
    model = km.models.multi_mnist_lenet()
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics={"left": ["accuracy"], "right": ["accuracy"]},
    )
    model.fit(x, y, batch_size=256, epochs=2, verbose=0)
    return model, x, y


def _batches(x, y, batch_size):
    batches, shares = [], []
    for start in range(0, len(x), batch_size):
        part = (x[start:start + batch_size], {k: v[start:start + batch_size] for k, v in y.items()})
        batches.append(keras.tree.map_structure(keras.ops.convert_to_tensor, part))
        shares.append(len(part[0]) / len(x))
    return batches, shares


def _system(model, batches, shares):
    """The MGDA weights and J^T e_1 at the model's point, full-data."""
    variables = list(model.trainable_variables)
    grads = None
    for batch, share in zip(batches, shares):
        _, part = mtl_backend.task_gradients(model, variables, batch)
        part = [[share * keras.ops.convert_to_numpy(g) for g in task] for task in part]
        grads = part if grads is None else [[a + b for a, b in zip(s, t)] for s, t in zip(grads, part)]
    flat = np.stack([np.concatenate([g.ravel() for g in task]) for task in grads]).astype(np.float64)
    alpha = np.asarray(km.solvers.min_norm(flat @ flat.T, ops=numpy_ops), np.float32)
    return variables, alpha, grads[0]


def _solve_once(model, batches, shares, solver, iters):
    """One solve with exactly `iters` iterations: seconds and iterations."""
    variables, alpha, rhs = _system(model, batches, shares)
    settings = dict(damping=0.1, max_iters=iters, tol=1e-30)
    started = time.perf_counter()
    if solver == "scipy":
        operator = mtl_backend.averaged_hvp(model, variables, batches, shares, alpha)
        v, done, _ = km.pareto.scipy_minres(operator, rhs, **settings)
    else:
        v, done, _ = mtl_backend.hessian_solve(model, variables, batches, shares, alpha, rhs, km.pareto.minres,
                                               **settings)
    keras.ops.convert_to_numpy(v[0])  # wait for the result
    return time.perf_counter() - started, int(keras.ops.convert_to_numpy(done))


def _direction(model, x, y, solver, steps, batch_size):
    front = km.pareto.explore(model, x, y, directions=[[1.0, 0.0]], steps=steps, solver=solver,
                              batch_size=batch_size, verbose=0)
    return front.cost["seconds"], front.cost["minres_iterations"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256, help="examples the HVPs average over")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=50, help="iterations of the fixed-length solve")
    parser.add_argument("--steps", type=int, default=10, help="steps of the direction")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=None, help="append a JSON line here")
    args = parser.parse_args()

    model, x, y = _model_and_data(args.examples)
    batches, shares = _batches(x, y, args.batch_size)
    solvers = ("keras", "scipy")
    for solver in solvers:  # compile and warm up both
        _solve_once(model, batches, shares, solver, 2)
        _direction(model, x, y, solver, 1, args.batch_size)
    solves = {s: [] for s in solvers}
    directions = {s: [] for s in solvers}
    for _ in range(args.repeats):
        for solver in solvers:
            solves[solver].append(_solve_once(model, batches, shares, solver, args.iters))
            directions[solver].append(_direction(model, x, y, solver, args.steps, args.batch_size))
    result = {"backend": keras.backend.backend(), "examples": args.examples, "batch_size": args.batch_size}
    for solver in solvers:
        best_solve, iterations = min(solves[solver])
        best_direction, per_solve = min(directions[solver])
        result[solver] = {
            "solve_ms": 1000 * best_solve, "ms_per_iteration": 1000 * best_solve / max(iterations, 1),
            "iterations": iterations, "direction_s": best_direction, "direction_iterations": per_solve,
        }
        print(f"{solver:>6}: {1000 * best_solve:8.1f} ms per {iterations}-iteration solve "
              f"({1000 * best_solve / max(iterations, 1):.2f} ms/iteration); {best_direction:6.2f} s per "
              f"direction of {args.steps} steps (iterations {per_solve})")
    ratio = result["scipy"]["direction_s"] / result["keras"]["direction_s"]
    print(f"scipy / keras time per direction: {ratio:.3f}")
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
