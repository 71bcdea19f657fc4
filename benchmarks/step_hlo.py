"""What XLA compiles for our JAX train step against plain Keras's: kernels
(fusions), library calls, loops, and the time of each stage, side by side
in one process.

On CPU XLA compiles every fusion as a kernel of its own (through LLVM), so
the number of fusions, not of operations, tracks compile time. The same
MultiMNIST LeNet as `step_time.py`, plain `keras.Model` and
`keras_mgda.MultiTaskModel` with the same weights, built on one batch; each
model's `train_step` is jitted, traced and lowered (`trace_s`, wall time)
and compiled by XLA (`compile_s`, wall time, and `compile_cpu_s`, process
CPU time: steadier on a shared machine), alternating between the two models, the least
of `--repeats` each. The fusions of our step are also grouped by where
they come from (the JAX op names of their root operations, task indices
folded into `#`), the groups where the two steps differ listed largest
first, with plain Keras's count beside ours.

Usage:
    python benchmarks/step_hlo.py --tasks 2 40
    python benchmarks/step_hlo.py --tasks 40 --method upgrad --groups 20 --output out/hlo.jsonl
"""

import argparse
import collections
import os
import re
import sys

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from hlo_stats import compile_stats  # noqa: E402
from step_time import _compile  # noqa: E402
from step_time import _data  # noqa: E402
from step_time import lenet  # noqa: E402
from step_time import make_weighting  # noqa: E402
from step_time import write_line  # noqa: E402

import keras_mgda as km  # noqa: E402
from keras_mgda import _keras  # noqa: E402

_FUNCTIONAL = re.compile(r"functional(_\d+)?")


def _unwrapped(part):
    """`transpose(jvp(dense))` -> `dense`: the name inside JAX's transforms."""
    while re.fullmatch(r"(jvp|transpose|vmap|jit)\(.*\)", part):
        part = part[part.index("(") + 1:-1]
    return part


def fusion_groups(hlo_text, depth=2):
    """Fusions counted by the first `depth` parts of their op name (below
    `jit(train_step)`): where in the traced program each kernel comes from."""
    groups = collections.Counter()
    for line in hlo_text.splitlines():
        if " fusion(" not in line:
            continue
        match = re.search(r'op_name="([^"]+)"', line)
        parts = match.group(1).split("/")[1:] if match else ["(no name)"]
        # Our step calls the heads through sub-models (`functional_<n>`):
        # dropped, so that a layer's kernels group alike in both steps.
        parts = [_unwrapped(part) for part in parts if not _FUNCTIONAL.fullmatch(_unwrapped(part))]
        # One group for what every task repeats: `task_#_hidden/dot_general`.
        groups[re.sub(r"\d+", "#", "/".join(parts[:depth]))] += 1
    return groups


def _state(model):
    """The `(trainable, non_trainable, optimizer, metrics)` values a JAX
    `train_step` takes."""
    values = lambda variables: [v.value for v in variables]  # noqa: E731
    return (values(model.trainable_variables), values(model.non_trainable_variables),
            values(model.optimizer.variables), values(model.metrics_variables))


def _models(num_tasks, method, on_nonfinite, batch):
    """Plain Keras's model and ours, the same weights, built on `batch`."""
    plain = lenet(num_tasks)
    ours = lenet(num_tasks, km.MultiTaskModel, weighting=make_weighting(method, num_tasks), on_nonfinite=on_nonfinite)
    ours.set_weights(plain.get_weights())
    for model in (plain, ours):
        _compile(model, num_tasks, "auto")
        _keras.symbolic_build(model, batch)
        model.optimizer.build(model.trainable_variables)
    return {"keras": plain, method: ours}


def measure(num_tasks, method, batch_size, repeats, groups, on_nonfinite="raise"):
    """Least trace and XLA compile times of `repeats` compilations each,
    HLO counts, and the fusion groups where our step differs from plain
    Keras's."""
    x, y = _data("lenet", num_tasks, batch_size, np.random.default_rng(0))
    batch = (x, y)
    models = _models(num_tasks, method, on_nonfinite, batch)
    best, texts = {}, {}
    for _ in range(repeats):
        for name, model in models.items():
            # A new jit each time: nothing cached from the last compilation.
            stats = compile_stats(jax.jit(model.train_step), _state(model), batch)
            texts[name] = stats.pop("text")
            for key, value in stats.items():
                best[f"{name}_{key}"] = min(value, best.get(f"{name}_{key}", value))
    result = {"backend": "jax", "jax": jax.__version__, "keras": keras.__version__, "method": method,
              "tasks": num_tasks, "batch_size": batch_size, "repeats": repeats, "on_nonfinite": on_nonfinite}
    result.update(best)
    for key in ("trace_s", "compile_cpu_s", "fusions"):
        result[f"{key.removesuffix('_s')}_ratio"] = round(best[f"{method}_{key}"] / best[f"keras_{key}"], 3)
    ours, plain = fusion_groups(texts[method]), fusion_groups(texts["keras"])
    differ = sorted((g for g in set(ours) | set(plain) if ours[g] != plain[g]), key=lambda g: -abs(ours[g] - plain[g]))
    result["groups"] = [[g, ours[g], plain[g]] for g in differ[:groups]]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 40])
    parser.add_argument("--method", default="mgda", help="a weighting by lowercase name")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="compilations per model; the least time counts")
    parser.add_argument("--groups", type=int, default=12, help="largest fusion groups to list")
    parser.add_argument("--on-nonfinite", default="raise", choices=["raise", "skip"],
                        help="our model's policy for NaN/Inf steps")
    parser.add_argument("--output", help="append JSON lines here")
    args = parser.parse_args()
    for num_tasks in args.tasks:
        result = measure(num_tasks, args.method, args.batch_size, args.repeats, args.groups, args.on_nonfinite)
        write_line(result, args.output)


if __name__ == "__main__":
    main()
