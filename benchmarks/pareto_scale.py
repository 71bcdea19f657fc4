"""The cost of Pareto exploration's Hessian-vector product at scale: the
CelebA model (`keras_mgda.models.celeba_resnet18`: ResNet-18 trunk, 40
linear heads, 11M weights) on synthetic 64x64 images, one small batch.

Time and peak memory of one Hessian-vector product of sum_t alpha_t L_t
with respect to every trainable weight (`keras_mgda.backend.
hessian_vector_product`, inference mode), against one MGDA-UB training
step (`train_on_batch`) on the same batch; also what each exploration
point needs once for the Gram matrix J J^T and J^T beta: T gradients of
one task each (`weighted_gradient`) and T forward-mode products J g_t
(`task_jvp`), which hold one parameter-sized vector at a time; and, for
comparison, all T task gradients at once (`task_gradients`, a T x P
matrix), which explore no longer uses. Times: best of
`--repeats`, the operations alternating in one process (the machine's
load drifts; alternating keeps the ratios fair). Memory: each operation
in a fresh process, the peak resident set size while it runs minus the
peak after the model and the data are built. Beside them, what
materialising a (T x parameters) matrix would take (T * P * 4 bytes); a
(parameters x parameters) one would take P^2 * 4 bytes (480 TB). Run with
`--tasks 2` too: the Hessian-vector product's memory does not grow with
the number of tasks.

The backend comes from KERAS_BACKEND (torch is the fastest on these CPUs).
These machines are noisy: compare numbers from one run.

Usage:
    OMP_NUM_THREADS=1 KERAS_BACKEND=torch python benchmarks/pareto_scale.py
    KERAS_BACKEND=torch python benchmarks/pareto_scale.py --batch-size 32 --repeats 5
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import keras
import numpy as np

import keras_mgda as km
from keras_mgda import backend as mtl_backend

OPERATIONS = ("step", "hvp", "weighted_gradient", "task_jvp", "task_gradients")


def _setup(batch_size, tasks, width, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    attributes = [f"attr_{t}" for t in range(tasks)]
    model = km.models.celeba_resnet18(attributes=attributes, width=width)
    model.compile(keras.optimizers.Adam(5e-4), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    x = rng.normal(size=(batch_size, 64, 64, 3)).astype("float32")
    y = {a: rng.integers(0, 2, size=(batch_size, 1)).astype("float32") for a in attributes}
    batch = (keras.ops.convert_to_tensor(x), {a: keras.ops.convert_to_tensor(v) for a, v in y.items()})
    model.step_plan_for(batch)
    return model, batch


def _operation(name, model, batch):
    variables = list(model.trainable_variables)
    tasks = model.step_plan.num_tasks
    if name == "step":
        return lambda: model.train_on_batch(batch[0], batch[1])
    if name == "task_gradients":
        return lambda: keras.ops.convert_to_numpy(mtl_backend.task_gradients(model, variables, batch)[1][-1][0])
    alpha = np.full(tasks, 1.0 / tasks, np.float32)
    if name == "weighted_gradient":
        return lambda: keras.ops.convert_to_numpy(mtl_backend.weighted_gradient(model, variables, batch, alpha)[1][0])
    rng = np.random.default_rng(1)
    vectors = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in variables]
    if name == "task_jvp":
        return lambda: keras.ops.convert_to_numpy(mtl_backend.task_jvp(model, variables, batch, vectors))
    return lambda: keras.ops.convert_to_numpy(
        mtl_backend.hessian_vector_product(model, variables, batch, alpha, vectors)[0])


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def peak_memory(name, batch_size, tasks, width):
    """The peak memory one operation adds, MB, and the number of weights."""
    model, batch = _setup(batch_size, tasks, width)
    baseline = _peak_mb()
    run = _operation(name, model, batch)
    run()
    run()
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return {"peak_extra_mb": _peak_mb() - baseline, "parameters": parameters}


def times(batch_size, tasks, width, repeats):
    """Best-of-`repeats` seconds per operation, alternating."""
    model, batch = _setup(batch_size, tasks, width)
    runs = {name: _operation(name, model, batch) for name in OPERATIONS}
    best = {}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if round_:  # the first round warms up
                best[name] = min(best.get(name, np.inf), time.perf_counter() - started)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--width", type=int, default=64, help="filters of the first stage (64: ResNet-18)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=OPERATIONS, help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--output", default=None, help="append a JSON line here")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(peak_memory(args.only, args.batch_size, args.tasks, args.width)))
        return
    results = {}
    for name in OPERATIONS:  # each in a fresh process, for its own peak memory
        command = [sys.executable, __file__, "--only", name, "--batch-size", str(args.batch_size),
                   "--tasks", str(args.tasks), "--width", str(args.width)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    for name, seconds in times(args.batch_size, args.tasks, args.width, args.repeats).items():
        results[name]["seconds"] = seconds
    parameters = results["hvp"]["parameters"]
    matrix_mb = args.tasks * parameters * 4 / 2**20
    print(f"{keras.backend.backend()}, batch {args.batch_size}, {args.tasks} tasks, {parameters / 1e6:.2f}M weights; "
          f"a (T x P) float32 matrix would take {matrix_mb:.0f} MB")
    step = results["step"]["seconds"]
    for name in OPERATIONS:
        r = results[name]
        print(f"{name:>15}: {1000 * r['seconds']:8.1f} ms  ({r['seconds'] / step:.2f} x a step), "
              f"peak memory +{r['peak_extra_mb']:.0f} MB")
    # What explore pays per point for the Gram matrix without holding J:
    # T backward passes and T forward-mode passes.
    gram = args.tasks * (results["weighted_gradient"]["seconds"] + results["task_jvp"]["seconds"])
    print(f"{'Gram, O(P) way':>15}: {1000 * gram:8.1f} ms  ({gram / step:.2f} x a step) per exploration point")
    summary = {"backend": keras.backend.backend(), "batch_size": args.batch_size, "tasks": args.tasks,
               "width": args.width, "results": results, "t_by_p_matrix_mb": matrix_mb}
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
