"""Continuous Pareto exploration from converged MultiMNIST models, against
the static-weights grid and weighted-sum fine-tunes from the same start.

Stage `train` trains the starts with the authors' protocol, exactly as
`benchmarks/multi_mnist.py` does (its data, splits, LeNet, SGD schedule, 100
epochs), and saves each final model's weights under `--runs` (never in the
repository). Stage `compare` explores from each start and writes the
comparison JSON.

Usage:
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/pareto_multi_mnist.py train \\
        --starts mgda_ub:0 mgda_ub:1 mgda_ub:2 grid:0:0.833333
"""

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ROOT / "runs" / "pareto_multi_mnist"


def _campaign():
    """benchmarks/multi_mnist.py as a module (its data, model and schedule)."""
    spec = importlib.util.spec_from_file_location("benchmark_multi_mnist", ROOT / "benchmarks" / "multi_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchmark_multi_mnist", module)
    spec.loader.exec_module(module)
    return module


def parse_start(text):
    """`method:seed[:left_weight]` -> dict (a grid start names its left weight)."""
    parts = text.split(":")
    if parts[0] not in ("mgda_ub", "grid") or len(parts) != (3 if parts[0] == "grid" else 2):
        raise argparse.ArgumentTypeError(f"a start is mgda_ub:SEED or grid:SEED:LEFT_WEIGHT; received {text!r}")
    start = {"method": parts[0], "seed": int(parts[1])}
    if parts[0] == "grid":
        left = float(parts[2])
        start["weights"] = {"left": left, "right": round(1.0 - left, 6)}
    return start


def start_name(start):
    """The folder name of a start: `mgda_ub-seed0`, `grid0.833-seed0`."""
    if start["method"] == "grid":
        return f"grid{start['weights']['left']:.3f}-seed{start['seed']}"
    return f"{start['method']}-seed{start['seed']}"


def train_starts(args):
    """Trains every start not saved yet; saves `model.weights.h5` and
    `train.json` (per-epoch history, seconds) in its folder."""
    campaign = _campaign()
    keras = campaign._import_keras(None)
    flags = campaign.parse_args(["--epochs", str(args.epochs)])
    for start in args.starts:
        folder = Path(args.runs) / start_name(start)
        if (folder / "model.weights.h5").exists():
            print(f"{folder} exists, skipped", flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        splits = campaign.load_data(flags, start["seed"])
        keras.utils.set_random_seed(start["seed"])
        model = campaign._build(flags, campaign.make_weighting(start["method"], flags, start.get("weights")))
        campaign._compile(keras, model, flags, campaign.TASKS)
        started = time.perf_counter()
        history = campaign._fit(keras, model, campaign.TASKS, splits, start_name(start), flags)
        seconds = time.perf_counter() - started
        model.save_weights(str(folder / "model.weights.h5"))
        record = dict(start, epochs=args.epochs, backend=keras.backend.backend(), wall_seconds=round(seconds, 2),
                      train_seconds=round(sum(e["train_seconds"] for e in history), 2),
                      settings=campaign.settings(flags, start["method"]),
                      environment=campaign.environment(keras.backend.backend()), history=history)
        with open(folder / "train.json", "w") as handle:
            json.dump(record, handle, indent=1)
        print(f"saved {folder}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("train",))
    p.add_argument("--starts", nargs="+", type=parse_start, default=[parse_start("mgda_ub:0")])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--runs", default=str(DEFAULT_RUNS), help=f"where models are saved, default {DEFAULT_RUNS}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.stage == "train":
        train_starts(args)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")
    main()
