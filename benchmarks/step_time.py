"""Step time of a weighting's `fit` against plain Keras `fit`, side by side.

The same MultiMNIST LeNet (conv10-5, pool, conv20-5, pool, dense 50 = Z;
each head dense 50, dense 10), the same weights, the same data, in one
process; runs alternate between the two models and the ratio is taken of the
best-of-N epoch times (these machines are noisy; never assert a time in a
test). The backend comes from KERAS_BACKEND.

Compile time: the first `fit` call (two steps, in a fresh model) minus
two steady steps, the latency of tracing and compiling the train step;
`compile_ratio` compares ours with plain Keras's, and `compile_cpu_ratio`
the same in process CPU time (all threads), steadier on a shared machine.
On TensorFlow our model builds its losses and optimizer before the first
trace (Keras builds them inside it); `--eager-build` builds plain Keras's
the same way, for a like-for-like ratio of the tracing alone.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/step_time.py --tasks 2 40
    python benchmarks/step_time.py --method uniform pcgrad --tasks 2 --repeats 7
    python benchmarks/step_time.py --method all --tasks 2 40 --output out/methods.jsonl
    python benchmarks/step_time.py --model celeba --tasks 40 --batch-size 32 --method mgda mgda-parameters
"""

import argparse
import json
import time

import keras
import numpy as np

import keras_mgda as km
from keras_mgda import _keras


def _methods():
    """Every weighting by lowercase name, plus MGDA's parameter-space mode."""
    methods = dict(km.weighting.by_name())
    methods["mgda-parameters"] = lambda: km.weighting.MGDA(mode="parameters")
    return methods


METHODS = _methods()


def make_weighting(method, num_tasks):
    if method == "static":
        return km.weighting.Static([1.0] * num_tasks)
    return METHODS[method]()


def lenet(num_tasks, model_class=keras.Model, **kwargs):
    """The authors' MultiMNIST LeNet with `num_tasks` heads."""
    x = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Conv2D(10, 5, activation="relu")(x)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(20, 5, activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    z = keras.layers.Dense(50, activation="relu", name="shared")(h)
    outputs = {}
    for t in range(num_tasks):
        head = keras.layers.Dense(50, activation="relu", name=f"task_{t}_hidden")(z)
        outputs[f"task_{t}"] = keras.layers.Dense(10, name=f"task_{t}")(head)
    return model_class(x, outputs, **kwargs)


def celeba(num_tasks, model_class=keras.Model, width=64, **kwargs):
    """The authors' CelebA ResNet-18 (64x64 images) with `num_tasks` linear
    heads (one logit each)."""
    attributes = [f"task_{t}" for t in range(num_tasks)]
    if model_class is keras.Model:
        model = km.models.celeba_resnet18(km.weighting.Uniform(), attributes=attributes, width=width)
        return keras.Model(model.inputs, model.outputs)
    return km.models.celeba_resnet18(kwargs.pop("weighting"), attributes=attributes, width=width, **kwargs)


MODELS = {"lenet": lenet, "celeba": celeba}


def _data(model_name, num_tasks, n, rng):
    if model_name == "celeba":
        x = rng.normal(size=(n, 64, 64, 3)).astype("float32")
        y = {f"task_{t}": rng.integers(0, 2, size=(n, 1)).astype("float32") for t in range(num_tasks)}
        return x, y
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    return x, {f"task_{t}": rng.integers(0, 10, size=(n,)).astype("int32") for t in range(num_tasks)}


def _compile(model, num_tasks, jit_compile, model_name="lenet"):
    if model_name == "celeba":
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-2, momentum=0.9),
        loss={f"task_{t}": loss for t in range(num_tasks)},
        jit_compile=jit_compile,
    )


def _epoch_time(model, x, y, batch_size, clock=time.perf_counter):
    start = clock()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    return clock() - start


def _warm_up_backend(model_name):
    """One throwaway plain `fit`: the backend's one-time start-up (JAX's
    first compilations, TensorFlow's first graph) would otherwise land in
    the compile time of whichever model is measured first."""
    # Two tasks: a one-output model takes its targets as an array, not a dict.
    model = MODELS[model_name](2)
    _compile(model, 2, "auto", model_name)
    x, y = _data(model_name, 2, 8, np.random.default_rng(0))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


def _first_fit_time(model, x, y, batch_size, eager_build):
    """The first `fit`, on two batches; with `eager_build`, the model's
    losses and optimizer are built from the first batch beforehand, inside
    the timed window. Returns wall and process CPU seconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    if eager_build:
        _keras.symbolic_build(model, (x[:batch_size], {k: v[:batch_size] for k, v in y.items()}))
    two_batches = {k: v[: 2 * batch_size] for k, v in y.items()}
    _epoch_time(model, x[: 2 * batch_size], two_batches, batch_size)
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure(
    num_tasks, method, steps, batch_size, repeats, jit_compile, seed=0, on_nonfinite="raise",
    model_name="lenet", eager_build=False,
):
    """Returns best-of-`repeats` seconds per step for plain Keras and for the
    weighting, and their ratio."""
    rng = np.random.default_rng(seed)
    x, y = _data(model_name, num_tasks, steps * batch_size, rng)
    build = MODELS[model_name]
    plain = build(num_tasks)
    ours = build(
        num_tasks,
        km.MultiTaskModel,
        weighting=make_weighting(method, num_tasks),
        on_nonfinite=on_nonfinite,
    )
    ours.set_weights(plain.get_weights())
    first = {}
    for name, model in (("keras", plain), (method, ours)):
        _compile(model, num_tasks, jit_compile, model_name)
        first[name] = _first_fit_time(model, x, y, batch_size, eager_build and model is plain)

    times = {"keras": [], method: []}
    for _ in range(repeats):
        times["keras"].append(_epoch_time(plain, x, y, batch_size) / steps)
        times[method].append(_epoch_time(ours, x, y, batch_size) / steps)
    best_plain, best_ours = min(times["keras"]), min(times[method])
    # CPU time (all threads) of the first fit beyond two steady steps: what
    # tracing and compiling cost, steadier than wall time on a shared machine.
    step_cpu = {name: _epoch_time(model, x, y, batch_size, time.process_time) / steps
                for name, model in (("keras", plain), (method, ours))}
    compile_plain = first["keras"][0] - 2 * best_plain
    compile_ours = first[method][0] - 2 * best_ours
    compile_cpu = {name: first[name][1] - 2 * step_cpu[name] for name in first}
    return {
        "backend": keras.backend.backend(),
        "model": model_name,
        "method": method,
        "tasks": num_tasks,
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "repeats": repeats,
        "jit_compile": jit_compile,
        "on_nonfinite": on_nonfinite,
        "eager_build": eager_build,
        "keras_ms_per_step": round(1e3 * best_plain, 3),
        f"{method}_ms_per_step": round(1e3 * best_ours, 3),
        "ratio": round(best_ours / best_plain, 3),
        "keras_compile_s": round(compile_plain, 3),
        f"{method}_compile_s": round(compile_ours, 3),
        "compile_ratio": round(compile_ours / compile_plain, 3),
        "keras_compile_cpu_s": round(compile_cpu["keras"], 3),
        f"{method}_compile_cpu_s": round(compile_cpu[method], 3),
        "compile_cpu_ratio": round(compile_cpu[method] / compile_cpu["keras"], 3),
    }


def write_line(result, output=None):
    """Prints `result` as a JSON line, and appends it to `output` if given."""
    line = json.dumps(result)
    print(line, flush=True)
    if output:
        with open(output, "a") as f:
            f.write(line + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 40])
    parser.add_argument(
        "--method", nargs="+", default=["mgda"], choices=sorted(METHODS) + ["all"],
        help="one or more weightings by lowercase name, or 'all'",
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jit-compile", default="auto", help="'auto', 'true' or 'false'")
    parser.add_argument(
        "--on-nonfinite", default="raise", choices=["raise", "skip"],
        help="the model's policy for NaN/Inf steps (raise, the default, checks every step on the host on JAX)",
    )
    parser.add_argument(
        "--model", default="lenet", choices=sorted(MODELS),
        help="the MultiMNIST LeNet (default) or the CelebA ResNet-18 (64x64 images)",
    )
    parser.add_argument(
        "--eager-build", action="store_true",
        help="build plain Keras's losses and optimizer before its first fit, as our model does on TensorFlow",
    )
    parser.add_argument("--output", help="append JSON lines here")
    args = parser.parse_args()
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile.lower()]
    methods = sorted(METHODS) if "all" in args.method else args.method
    _warm_up_backend(args.model)
    for method in methods:
        for num_tasks in args.tasks:
            result = measure(
                num_tasks, method, args.steps, args.batch_size, args.repeats, jit,
                on_nonfinite=args.on_nonfinite, model_name=args.model, eager_build=args.eager_build,
            )
            write_line(result, args.output)


if __name__ == "__main__":
    main()
