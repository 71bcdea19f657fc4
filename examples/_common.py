"""What the three benchmark examples share: the method flag, the run (Keras's
`fit` with its progress bar, the History as CSV, the results as JSON) and
single-task baselines.

Imported before Keras by each example: it makes TensorFlow the default
backend (`KERAS_BACKEND` still wins), so the examples run on a TensorFlow
GPU when one is present.
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

import keras_mgda as km  # noqa: E402

SINGLE = "single"


def weighting_classes():
    """Every weighting of `keras_mgda.weighting`, by lowercase class name."""
    return km.weighting.by_name()


def method_names():
    """The names `--method` accepts."""
    return sorted(set(weighting_classes()) | {"mgda", "mgda-parameters", SINGLE})


def make_weighting(method, num_tasks):
    """The weighting a method name stands for (None: MGDA-UB, the default of
    `MGDAModel`, with the authors' loss+ normalisation).

    `mgda-parameters` is MGDA on the shared weights (the paper's "without
    approximation"); `static` weighs every task 1/T; any other name is a
    class of `keras_mgda.weighting` built with its defaults.
    """
    if method == "mgda":
        return None
    if method == "mgda-parameters":
        return km.weighting.MGDA(mode="parameters")
    classes = weighting_classes()
    if method not in classes:
        raise SystemExit(f"Unknown --method {method!r}; choose from {', '.join(method_names())}.")
    if method == "static":
        return classes[method]([1.0 / num_tasks] * num_tasks)
    try:
        return classes[method]()
    except TypeError as error:
        raise SystemExit(
            f"--method {method} needs arguments this script does not pass ({error}); "
            "build it in Python: keras_mgda.MultiTaskModel(..., weighting=...)."
        ) from error


def parser(description, *, epochs, batch_size, lr, output):
    """The flags every example takes, with the authors' settings as defaults."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--method", default="mgda", metavar="NAME",
        help="mgda (MGDA-UB, default), mgda-parameters, uniform, any weighting of "
        "keras_mgda.weighting by lowercase name, or 'single' for single-task "
        f"baselines. Known now: {', '.join(method_names())}.",
    )
    p.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate, default {lr}")
    p.add_argument("--output", default=output, help=f"folder for results.json and history.csv, default {output}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-examples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--test-examples", type=int, default=None, help="use only the first N test examples")
    p.add_argument(
        "--tasks", nargs="+", default=None,
        help="with --method single: the tasks to train a baseline for (default: all)",
    )
    p.add_argument(
        "--baseline", default=None,
        help="results.json of a --method single run: adds delta_m (Maninis et al.) to the results",
    )
    p.add_argument("--verbose", default="auto", help="fit's verbosity: auto (progress bar), 0, 1 or 2")
    return p


def runtime():
    """Backend, Keras version and the accelerators the backend sees."""
    backend = keras.backend.backend()
    devices = []
    if backend == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
    elif backend == "jax":
        import jax

        devices = [str(d) for d in jax.devices() if d.platform != "cpu"]
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"backend": backend, "keras": keras.__version__, "accelerators": devices or ["none (CPU)"]}


def _verbose(value):
    return value if value == "auto" else int(value)


def _pick(scores, task, metric):
    for key in (f"{task}_{metric}", metric):
        if key in scores:
            return float(scores[key])
    raise KeyError(f"no {metric!r} for {task!r} in {sorted(scores)}")


def run(
    args, benchmark, build_model, compile_kwargs, train, test, primary,
    callbacks=(), validation=None, info=None, summary=None,
):
    """Trains and evaluates one method (or the single-task baselines) and
    writes `results.json` and the History CSV into `args.output`.

    Args:
        args: the parsed flags.
        benchmark: name of the benchmark, for the results.
        build_model: `weighting -> uncompiled MultiTaskModel`.
        compile_kwargs: `() -> dict` for `compile` (a fresh optimizer each call).
        train, test: batched `tf.data` datasets of `(x, {task: y})`.
        primary: `{task: (metric name, lower_is_better)}`, the number per
            task that the paper reports.
        callbacks: more Keras callbacks for `fit` (e.g. the LR schedule).
        validation: data evaluated after every epoch (default: `test`).
        info: more entries for the results (data source, ...).
        summary: optional `scores -> dict` of derived numbers (a mean) to
            add to the results.

    Returns:
        The results dict.
    """
    os.makedirs(args.output, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    tasks = list(primary)
    results = {
        "benchmark": benchmark,
        "method": args.method,
        "settings": {
            "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
            "seed": args.seed, "train_examples": args.train_examples, "test_examples": args.test_examples,
        },
        "runtime": runtime(),
    }
    results.update(info or {})
    print(f"{benchmark}: method {args.method}, keras {keras.__version__} on "
          f"{results['runtime']['backend']}, accelerators: {', '.join(results['runtime']['accelerators'])}")
    validation = test if validation is None else validation
    start = time.time()
    if args.method == SINGLE:
        chosen = args.tasks or tasks
        unknown = sorted(set(chosen) - set(tasks))
        if unknown:
            raise SystemExit(f"Unknown --tasks {unknown}; the tasks are {tasks}.")
        results["scores"] = {}
        results["test"] = {}
        for task in chosen:
            print(f"single-task baseline: {task}")
            keras.utils.set_random_seed(args.seed)
            model = km.single_task_model(build_model(km.weighting.Uniform()), task)
            options = compile_kwargs()
            options["loss"] = {task: options["loss"][task]}
            options["metrics"] = {task: options.get("metrics", {}).get(task, [])}
            model.compile(**options)
            only = _only(task)
            history = model.fit(
                train.map(only), epochs=args.epochs, validation_data=validation.map(only),
                callbacks=[*callbacks, keras.callbacks.CSVLogger(os.path.join(args.output, f"history_{task}.csv"))],
                verbose=_verbose(args.verbose),
            )
            scores = model.evaluate(test.map(only), verbose=0, return_dict=True)
            results["test"][task] = {k: float(v) for k, v in scores.items()}
            results["scores"][task] = _pick(scores, task, primary[task][0])
            del history
    else:
        weighting = make_weighting(args.method, len(tasks))
        model = build_model(weighting)
        model.compile(**compile_kwargs())
        results["weighting"] = repr(model.weighting)
        history = model.fit(
            train, epochs=args.epochs, validation_data=validation,
            callbacks=[*callbacks, keras.callbacks.CSVLogger(os.path.join(args.output, "history.csv"))],
            verbose=_verbose(args.verbose),
        )
        scores = model.evaluate(test, verbose=0, return_dict=True)
        results["test"] = {k: float(v) for k, v in scores.items()}
        results["scores"] = {task: _pick(scores, task, primary[task][0]) for task in tasks}
        results["last_epoch_task_weights"] = {
            task: float(history.history[f"{task}_alpha"][-1])
            for task in tasks if f"{task}_alpha" in history.history
        }
        save_weights_plot(history, args.output)
    results["train_and_test_seconds"] = round(time.time() - start, 1)
    if summary is not None:
        results.update(summary(results["scores"]))
    results["primary_metrics"] = {task: {"metric": m, "lower_is_better": low} for task, (m, low) in primary.items()}
    if args.baseline:
        with open(args.baseline) as handle:
            baseline = json.load(handle)["scores"]
        shared = [t for t in results["scores"] if t in baseline]
        results["delta_m"] = km.metrics.delta_m(
            {t: results["scores"][t] for t in shared},
            {t: baseline[t] for t in shared},
            {t: primary[t][1] for t in shared},
        )
        results["delta_m_tasks"] = shared
    path = os.path.join(args.output, "results.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    shown = {"scores": results["scores"]}
    if "delta_m" in results:
        shown["delta_m"] = results["delta_m"]
    print(json.dumps(shown, indent=2))
    print(f"wrote {path}")
    return results


def save_weights_plot(history, output):
    """The task weights over training (`keras_mgda.plots.task_weights`) as
    task_weights.png beside the results; skipped without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no task_weights.png")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = km.plots.task_weights(history)
    path = os.path.join(output, "task_weights.png")
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path}")


def _only(task):
    def select(x, y):
        return x, {task: y[task]}

    return select


def limit(dataset, count):
    """The first `count` examples, or all when `count` is None."""
    return dataset if count is None else dataset.take(count)
