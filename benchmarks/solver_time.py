"""Solve time of `keras_mgda.solvers.min_norm` against an earlier version of
it, side by side in one process.

The earlier solver (`keras_mgda/solvers.py` and `keras_mgda/active_set.py`
at the git commit `--reference`, by default the last one whose polish was
the primal active-set method) is read from git into a temporary module, so
the package keeps no copy of it. Both solve the same float32 Gram matrices, one T x T problem
at a time as the train step does: half of correlated gradients (a shared
direction plus noise, as in multi-task networks), half of gradients in
general position, in 2 T dimensions. Runs alternate between the two
solvers; each figure is the best of `--repeats` runs of `--calls` solves,
in microseconds per solve, and `ratio` is new over old. The backend comes
from KERAS_BACKEND:

- jax: each solver under `jax.jit`, the calls inside one `lax.map` (no
  dispatch in the timing); also XLA's compile time (wall and CPU: the CPU
  time is steadier on a shared machine) and the optimised HLO's fusions
  (each a kernel compiled of its own on CPU, see `hlo_stats.py`).
- tensorflow: under `tf.function`, with and without XLA, the calls inside
  one `tf.map_fn`.
- torch: eager `keras.ops`, and the direct-torch namespace `torch_ops`.
- every backend: the NumPy namespace `numpy_ops`, which the torch train
  step solves MGDA's problem with, on the host.

Never assert a time in a test: these machines are noisy.

Usage:
    KERAS_BACKEND=jax python benchmarks/solver_time.py --tasks 10 40
    KERAS_BACKEND=torch python benchmarks/solver_time.py --tasks 40 --repeats 9 --output out/solver.jsonl
"""

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np

from keras_mgda import solvers
from keras_mgda.backend import numpy_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import write_line  # noqa: E402

# The last commit whose min_norm polished with the primal active-set method.
REFERENCE_COMMIT = "b7c4a9c"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_reference(commit):
    """`keras_mgda.solvers` as of `commit`, as a module read from git (its
    `active_set.py` beside it); `keras_mgda.numerics` is today's."""
    directory = tempfile.mkdtemp(prefix="keras_mgda_reference_")
    for name in ("solvers", "active_set"):
        source = subprocess.run(
            ["git", "-C", ROOT, "show", f"{commit}:keras_mgda/{name}.py"],
            capture_output=True, text=True, check=True,
        ).stdout
        source = source.replace("from keras_mgda.active_set import", "from _reference_active_set import")
        with open(os.path.join(directory, f"_reference_{name}.py"), "w") as f:
            f.write(source)
    sys.path.insert(0, directory)
    return importlib.import_module("_reference_solvers")


def make_grams(num_tasks, count, seed=0):
    """(count, T, T) float32 Gram matrices, half correlated, half general."""
    rng = np.random.default_rng([seed, num_tasks])
    dims = 2 * num_tasks
    grams = []
    for index in range(count):
        g = rng.standard_normal((num_tasks, dims))
        if index % 2 == 0:
            g = rng.standard_normal(dims) + 1.5 * g
        grams.append(g @ g.T)
    return np.stack(grams).astype("float32")


def _solvers_on_backend(module):
    """`{namespace: function of a (K, T, T) array solving each problem}`."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return {"keras.ops (jax.jit)": jax.jit(lambda g: jax.lax.map(module.min_norm, g))}
    if backend == "tensorflow":
        import tensorflow as tf

        def compiled(jit_compile):
            return tf.function(
                lambda g: tf.map_fn(module.min_norm, g, parallel_iterations=1), jit_compile=jit_compile
            )

        # Graph mode is what the CPU step runs (Keras's "auto" turns XLA off
        # on CPU-only machines); XLA what it runs on a GPU.
        return {"keras.ops (tf.function)": compiled(False), "keras.ops (tf.function, XLA)": compiled(True)}
    from keras_mgda.backend import torch_ops

    def eager(namespace):
        return lambda grams: [module.min_norm(g, ops=namespace) for g in grams]

    return {"keras.ops (eager torch)": eager(keras.ops), "torch_ops": eager(torch_ops)}


def _namespaces(module):
    functions = _solvers_on_backend(module)
    functions["numpy_ops"] = lambda grams: [module.min_norm(g, ops=numpy_ops) for g in grams]
    return functions


def _inputs(namespace, grams):
    if namespace == "numpy_ops":
        return grams
    return keras.ops.convert_to_tensor(grams)


def _run(function, grams):
    start = time.perf_counter()
    out = function(grams)
    keras.tree.map_structure(keras.ops.convert_to_numpy, out)  # waits for the result
    return time.perf_counter() - start


def time_solvers(num_tasks, calls, repeats, reference):
    """Best-of-`repeats` microseconds per solve, old and new, per namespace."""
    grams = make_grams(num_tasks, calls)
    old, new = _namespaces(reference), _namespaces(solvers)
    results = []
    for namespace in new:
        inputs = _inputs(namespace, grams)
        for function in (old[namespace], new[namespace]):  # compile / warm up
            _run(function, inputs)
        times = {"old": [], "new": []}
        for _ in range(repeats):
            times["old"].append(_run(old[namespace], inputs) / calls)
            times["new"].append(_run(new[namespace], inputs) / calls)
        best_old, best_new = min(times["old"]), min(times["new"])
        results.append({
            "backend": keras.backend.backend(),
            "namespace": namespace,
            "tasks": num_tasks,
            "old_us": round(1e6 * best_old, 1),
            "new_us": round(1e6 * best_new, 1),
            "ratio": round(best_new / best_old, 3),
        })
    return results


def compile_solvers(num_tasks, repeats, reference):
    """JAX only: XLA compile time and HLO counts of one solve, old and new
    (alternating, the run with the least compile CPU time of `repeats`)."""
    import jax
    from hlo_stats import compile_stats

    gram = make_grams(num_tasks, 1)[0]
    best = {}
    for _ in range(repeats):
        for name, module in (("old", reference), ("new", solvers)):
            stats = compile_stats(jax.jit(lambda g, module=module: module.min_norm(g)), gram)
            if name not in best or stats["compile_cpu_s"] < best[name]["compile_cpu_s"]:
                best[name] = stats
    result = {"backend": "jax", "tasks": num_tasks}
    for name, stats in best.items():
        result.update({f"{name}_{key}": value for key, value in stats.items() if key != "text"})
    result["compile_cpu_ratio"] = round(best["new"]["compile_cpu_s"] / best["old"]["compile_cpu_s"], 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--calls", type=int, default=64, help="solves per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reference", default=REFERENCE_COMMIT, help="git commit of the earlier solver")
    parser.add_argument("--output", help="append JSON lines here")
    args = parser.parse_args()
    reference = load_reference(args.reference)
    lines = []
    for num_tasks in args.tasks:
        lines += time_solvers(num_tasks, args.calls, args.repeats, reference)
        if keras.backend.backend() == "jax":
            lines.append(compile_solvers(num_tasks, 2, reference))
    for line in lines:
        write_line(line, args.output)


if __name__ == "__main__":
    main()
