"""Exploration settings against one weighted-sum set, on MultiMNIST.

Trains the MGDA-UB start and the weighted-sum set of
`examples/pareto_front.py` once (cached in `--cache`, so later runs with
the same `--epochs` only explore), then runs `keras_mgda.pareto.explore`
from the start with each setting of `--settings` and prints, per setting,
its seconds (and their ratio to the weighted sum's training time), both
sets' hypervolumes on the test set (loss and error space, one reference
point per setting: 1.1 times the worst value of either set) and the range
of test accuracies the explored points cover.

Usage:
    KERAS_BACKEND=torch python benchmarks/pareto_settings.py --epochs 10 --settings \\
        '[{"examples": 256, "minres_iters": 10, "steps": 20, "step_size": 0.2}]'
    # a fresh sample of 4 batches of 256 per step, from the first 8,192 examples:
    KERAS_BACKEND=torch python benchmarks/pareto_settings.py --epochs 10 --settings \\
        '[{"examples": 8192, "batch_size": 256, "sample_batches": 4, "minres_iters": 5, "steps": 20, "step_size": 0.2}]'
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import pareto_front as example  # noqa: E402

import keras_mgda as km  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs of the start and of each weighted-sum run")
    p.add_argument("--settings", required=True,
                   help="JSON list of explore() keyword arguments, plus 'examples' (the first N training "
                   "examples to explore on, default 1024)")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "mnist.npz"))
    p.add_argument("--cache", default="runs/pareto_settings")
    p.add_argument("--figure", default=None, metavar="PATH",
                   help="draw each setting's front beside the weighted-sum set (PATH, with the setting's "
                   "index before the extension when there are several)")
    return p.parse_args()


def trained_start(args):
    """The MGDA-UB start and the weighted-sum points, trained once per
    epoch count and cached."""
    cache = os.path.join(args.cache, f"epochs{args.epochs}")
    os.makedirs(cache, exist_ok=True)
    example_args = example.parse_args(["--epochs", str(args.epochs), "--data", args.data])
    train_data, _, test = example.load(example_args)
    keras.utils.set_random_seed(example_args.seed)
    model = example.make_model(km.weighting.MGDA(normalization="none"), example_args)
    weights_path, info_path = os.path.join(cache, "start.npz"), os.path.join(cache, "weighted_sum.json")
    if os.path.exists(info_path):
        stored = np.load(weights_path)
        model.set_weights([stored[f"w{i}"] for i in range(len(stored.files))])
        with open(info_path) as f:
            info = json.load(f)
    else:
        init = example.make_model(km.weighting.MGDA(normalization="none"), example_args)
        example.copy_weights(model, init)  # the start the weighted-sum runs share
        example.train(model, train_data, example_args)
        np.savez(weights_path, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
        points, cost = example.weighted_sum(init, train_data, test, example_args)
        info = {"points": points, "cost": cost}
        with open(info_path, "w") as f:
            json.dump(info, f)
    return model, train_data, test, info


def explore_on_test(model, train_data, test, setting):
    """One exploration; its points scored on the test set, and its seconds."""
    setting = dict(setting)
    examples = setting.pop("examples", 1024)
    batch_size = setting.pop("batch_size", 1024)
    x, y = keras.tree.map_structure(lambda a: a[:examples], train_data)
    started = time.perf_counter()
    front = km.pareto.explore(model, x, y, batch_size=batch_size, verbose=0, **setting)
    seconds = time.perf_counter() - started
    on_test = km.pareto.ParetoFront(front.task_names, front.directions)
    for i in range(len(front)):
        front.restore(i)
        losses, accuracies = example.test_scores(model, test)
        metrics = {f"{t}_accuracy": float(a) for t, a in zip(example.TASKS, accuracies, strict=True)}
        on_test.add(losses, metrics, front.weights[i], front.direction_index[i], front.step_index[i])
    front.restore(0)
    return on_test, seconds


def main():
    args = parse_args()
    model, train_data, test, info = trained_start(args)
    ws_seconds = info["cost"]["seconds"]
    print(f"start: test accuracies {np.round(example.test_scores(model, test)[1], 4).tolist()}; "
          f"weighted sum: {len(info['points'])} runs of {args.epochs} epochs, {ws_seconds:.1f} s")
    settings = json.loads(args.settings)
    for index, setting in enumerate(settings):
        on_test, seconds = explore_on_test(model, train_data, test, setting)
        if args.figure:
            root, extension = os.path.splitext(args.figure)
            example.figure(on_test, info["points"], args.figure if len(settings) == 1 else f"{root}{index}{extension}")
        hv = example.hypervolumes(on_test, info["points"])
        accuracies = on_test.metric_values("accuracy")
        print(json.dumps({
            "setting": setting, "seconds": round(seconds, 1), "time_ratio": round(seconds / ws_seconds, 3),
            "hypervolume": {s: {"explored": round(h["explored"], 5), "weighted_sum": round(h["weighted_sum"], 5)}
                            for s, h in hv.items()},
            "accuracy_min": np.round(accuracies.min(0), 4).tolist(),
            "accuracy_max": np.round(accuracies.max(0), 4).tolist(),
        }), flush=True)


if __name__ == "__main__":
    main()
