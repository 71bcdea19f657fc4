"""Continuous Pareto exploration from converged MultiMNIST models, against
the static-weights grid and weighted-sum fine-tunes from the same start.

Stage `train` trains the starts with the authors' protocol, exactly as
`benchmarks/multi_mnist.py` does (its data, splits, LeNet, SGD schedule, 100
epochs), and saves each final model's weights under `--runs` (never in the
repository).

Stage `compare`, per start: `keras_mgda.pareto.explore` (both directions,
on `--explore-examples` of the start's training pairs), then the
weighted-sum fine-tunes from the same weights (the grid's 5 static
weightings, `--fine-tune-epochs` each, SGD momentum 0.9 at the schedule's
last rate); every point is scored on seed 0's 10,000 test pairs (the
committed grid's test set). It also times one pass of each kind (gradient,
forward-mode, Hessian-vector product, forward) on 1,024 examples, to state
costs in gradient-pass equivalents. It writes per-point losses,
accuracies, diagnostics and costs to `--output`; the comparison (hypervolume,
non-dominated points, spread, cost ratios) is
`benchmarks/pareto_multi_mnist_report.py`'s.

Stage `stationarity` measures `keras_mgda.pareto.stationarity_of` for
every saved model of each start (the final one and the `--checkpoints` of
training), on all its training pairs and on the exploration's subset.

Usage:
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/pareto_multi_mnist.py train \\
        --starts mgda_ub:0 mgda_ub:1 mgda_ub:2 grid:0:0.833333 --checkpoints 1 3 10 30
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/pareto_multi_mnist.py stationarity \\
        --starts mgda_ub:0 mgda_ub:1 mgda_ub:2 grid:0:0.833333
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/pareto_multi_mnist.py compare \\
        --starts mgda_ub:0 mgda_ub:1 mgda_ub:2 grid:0:0.833333 --fine-tune-epochs 1 2
    # another exploration setting from seed 0's start, kept beside the main one:
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python benchmarks/pareto_multi_mnist.py compare \\
        --starts mgda_ub:0 --tag minres10 --explore '{"batch_size": 512, "sample_batches": 2, \\
        "minres_iters": 10, "steps": 10, "step_size": 0.1, "seed": 0}'
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ROOT / "runs" / "pareto_multi_mnist"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "pareto_multi_mnist.json"
# Every point is scored on this seed's test pairs: the committed grid's.
TEST_SEED = 0


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


def _fit_with_checkpoints(campaign, keras, model, splits, name, flags, folder, epochs):
    """`benchmarks/multi_mnist.py`'s fit, also saving the weights after each
    epoch in `epochs` (`epoch<N>.weights.h5`: partly trained starts)."""

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 in epochs:
                self.model.save_weights(str(folder / f"epoch{epoch + 1}.weights.h5"))

    x, y = splits["train"]
    evaluation = campaign.make_epoch_callback(keras, campaign.TASKS, splits, name, flags)
    model.fit(x, y, batch_size=flags.batch_size, epochs=flags.epochs, shuffle=True, verbose=0,
              callbacks=[campaign._schedule(keras, flags), evaluation, Checkpoint()])
    return evaluation.history


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
        history = _fit_with_checkpoints(campaign, keras, model, splits, start_name(start), flags, folder,
                                        args.checkpoints)
        seconds = time.perf_counter() - started
        model.save_weights(str(folder / "model.weights.h5"))
        record = dict(start, epochs=args.epochs, backend=keras.backend.backend(), wall_seconds=round(seconds, 2),
                      train_seconds=round(sum(e["train_seconds"] for e in history), 2),
                      settings=campaign.settings(flags, start["method"]),
                      environment=campaign.environment(keras.backend.backend()), history=history)
        with open(folder / "train.json", "w") as handle:
            json.dump(record, handle, indent=1)
        print(f"saved {folder}", flush=True)


# Compare ------------------------------------------------------------------


def _final_lr(flags):
    """The learning rate of the schedule's last epoch (the fine-tunes' rate)."""
    return flags.lr * flags.lr_decay ** (flags.epochs // flags.lr_decay_every)


def load_model(campaign, keras, flags, weights, weighting=None):
    """A compiled LeNet with the weights of a `.weights.h5` (MGDA-UB's
    weighting unless given: exploration reads only the compiled losses)."""
    import keras_mgda as km

    model = campaign._build(flags, weighting or km.weighting.MGDA(normalization="none"))
    # Before compiling: the file's optimizer slots are not wanted (a fresh
    # SGD momentum for each fine-tune).
    model.load_weights(str(weights))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(_final_lr(flags), momentum=flags.momentum),
                  loss={t: loss for t in campaign.TASKS}, metrics={t: ["accuracy"] for t in campaign.TASKS})
    return model


def test_scores(model, test, tasks):
    """`{"losses": [T], "accuracies": [T]}` on the test pairs."""
    scores = model.evaluate(test[0], test[1], batch_size=2500, verbose=0, return_dict=True)
    return {"losses": [float(scores[f"{t}_loss"]) for t in tasks],
            "accuracies": [float(scores[f"{t}_accuracy"]) for t in tasks]}


def explore_start(model, train, test, tasks, args):
    """Explores from the model's point on a subset of its training pairs;
    returns every point's test scores and diagnostics, and the cost."""
    import keras_mgda as km

    order = np.random.default_rng(args.explore_seed).permutation(len(train[0]))[:args.explore_examples]
    x, y = train[0][order], {t: v[order] for t, v in train[1].items()}
    start_weights = model.get_weights()
    front = km.pareto.explore(model, x, y, **json.loads(args.explore), verbose=2)
    points = []
    for i in range(len(front)):
        front.restore(i)
        point = test_scores(model, test, tasks)
        point.update(direction=int(front.direction_index[i]), step=int(front.step_index[i]),
                     explore_losses=front.losses[i].tolist())
        for name in ("damping", "minres_residual", "descent", "stationarity"):
            value = float(getattr(front, name)[i])
            point[name] = None if np.isnan(value) else value
        points.append(point)
    model.set_weights(start_weights)
    cost = dict(front.cost, examples_explored=len(order))
    return {"points": points, "stopped": {str(k): v for k, v in front.stopped.items()}, "cost": cost}


def fine_tunes(campaign, keras, flags, folder, train, test, epoch_counts):
    """The weighted-sum fine-tunes from the start: one model per grid
    weighting, trained max(epoch_counts) epochs and scored after each count
    in `epoch_counts` (the set of k epochs each is the first k epochs).

    Returns:
        One dict per count: its points' test scores and the set's cost.
    """
    import keras_mgda as km

    sets = {k: {"epochs": k, "points": [], "cost": {"example_gradients": 5 * k * len(train[0]), "seconds": 0.0}}
            for k in epoch_counts}

    class Score(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds += time.perf_counter() - self.started
            if epoch + 1 in sets:
                point = dict(test_scores(self.model, test, campaign.TASKS), weights=self.weights)
                sets[epoch + 1]["points"].append(point)
                sets[epoch + 1]["cost"]["seconds"] += self.seconds
                print(f"  fine-tune {self.weights} x{epoch + 1}: {point}", flush=True)

    for weights in campaign.grid_weights(5):
        keras.utils.set_random_seed(0)
        model = load_model(campaign, keras, flags, Path(folder) / "model.weights.h5", km.weighting.Static(weights))
        score = Score()
        score.weights, score.seconds = [weights[t] for t in campaign.TASKS], 0.0
        model.fit(train[0], train[1], batch_size=flags.batch_size, epochs=max(epoch_counts), shuffle=True,
                  verbose=0, callbacks=[score])
    for entry in sets.values():
        entry["cost"]["seconds"] = round(entry["cost"]["seconds"], 2)
    return [sets[k] for k in sorted(sets)]


def unit_costs(model, train, repeats=5):
    """Seconds of one pass of each kind over 1,024 training pairs (best of
    `repeats`), and each as a multiple of the gradient pass."""
    from keras_mgda import backend as mtl_backend
    from keras_mgda.pareto import _data

    batch = _data.as_data(train[0][:1024], {t: v[:1024] for t, v in train[1].items()}).batches[0]
    variables = list(model.trainable_variables)
    grads = mtl_backend.weighted_gradient(model, variables, batch, np.array([1.0, 0.0], np.float32))[1]
    kinds = {
        "gradient": lambda: mtl_backend.weighted_gradient(model, variables, batch, np.array([1.0, 0.0], np.float32)),
        "jvp": lambda: mtl_backend.task_jvp(model, variables, batch, grads),
        "hvp": lambda: mtl_backend.hessian_vector_product(model, variables, batch, np.array([0.5, 0.5], np.float32),
                                                          grads),
        "forward": lambda: model.predict_on_batch(batch.x),
    }
    seconds = {}
    for name, call in kinds.items():
        call()  # warm up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        seconds[name] = min(times)
    return {"seconds_per_1024": seconds, "gradient_equivalents": {k: v / seconds["gradient"] for k, v in
                                                                   seconds.items()}}


def compare_start(campaign, keras, flags, start, args, test):
    """Exploration and fine-tunes from one saved start."""
    folder = Path(args.runs) / start_name(start)
    with open(folder / "train.json") as handle:
        trained = json.load(handle)
    train = campaign.load_data(flags, start["seed"])["train"]
    model = load_model(campaign, keras, flags, folder / "model.weights.h5")
    record = {"start": start, "name": start_name(start), "training": {
        "epochs": trained["epochs"], "train_seconds": trained["train_seconds"],
        "example_gradients": trained["epochs"] * len(train[0])}}
    record["start_scores"] = test_scores(model, test, campaign.TASKS)
    print(f"{record['name']}: start {record['start_scores']}", flush=True)
    record["explored"] = explore_start(model, train, test, campaign.TASKS, args)
    record["fine_tunes"] = (fine_tunes(campaign, keras, flags, folder, train, test, args.fine_tune_epochs)
                            if args.fine_tune_epochs and not args.tag else [])
    if args.unit_costs and "unit_costs" not in args.results:
        args.results["unit_costs"] = unit_costs(model, train)
    return record


def _epochs_of(path):
    """N for `epochN.weights.h5`, None for `model.weights.h5` (the final one)."""
    name = path.name.split(".")[0]
    return int(name[len("epoch"):]) if name.startswith("epoch") else None


def stationarity(args):
    """The stationarity measure of every saved model of each start (final
    and checkpoints) on all its training pairs and on the exploration's
    subset, with its test accuracies."""
    import keras_mgda as km

    campaign = _campaign()
    keras = campaign._import_keras(None)
    flags = campaign.parse_args(["--epochs", "100"])
    test = campaign.load_data(flags, TEST_SEED)["test"]
    results = json.load(open(args.output)) if os.path.exists(args.output) else {"starts": []}
    table = results.setdefault("stationarity", {})
    for start in args.starts:
        folder = Path(args.runs) / start_name(start)
        train = campaign.load_data(flags, start["seed"])["train"]
        order = np.random.default_rng(args.explore_seed).permutation(len(train[0]))[:args.explore_examples]
        subset = (train[0][order], {t: v[order] for t, v in train[1].items()})
        with open(folder / "train.json") as handle:
            trained_epochs = json.load(handle)["epochs"]
        for path in sorted(folder.glob("*.weights.h5")):
            model = load_model(campaign, keras, flags, path)
            epochs = _epochs_of(path) or trained_epochs
            entry = {"epochs": epochs, "all_training_pairs": km.pareto.stationarity_of(model, *train),
                     "exploration_subset": km.pareto.stationarity_of(model, *subset),
                     "test_accuracies": test_scores(model, test, campaign.TASKS)["accuracies"]}
            table.setdefault(start_name(start), {})[str(epochs)] = entry
            print(f"{start_name(start)} epoch {epochs}: {entry}", flush=True)
    _write(args.output, results)


def _write(path, results):
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".pareto_multi_mnist.", suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(results, stream, indent=1)
        stream.write("\n")
    os.replace(temporary, path)


def compare(args):
    """Runs `compare_start` for every start not in the output yet."""
    campaign = _campaign()
    keras = campaign._import_keras(None)
    flags = campaign.parse_args(["--epochs", "100"])
    test = campaign.load_data(flags, TEST_SEED)["test"]
    results = json.load(open(args.output)) if os.path.exists(args.output) else {"starts": []}
    if not args.tag:
        results.update(settings={"explore": json.loads(args.explore), "explore_examples": args.explore_examples,
                                 "explore_seed": args.explore_seed, "fine_tune_epochs": args.fine_tune_epochs,
                                 "fine_tune_lr": _final_lr(flags), "test_seed": TEST_SEED},
                       environment=campaign.environment(keras.backend.backend()))
    args.results = results
    # A tagged run is another exploration setting from the same start: it
    # goes to "variants", without fine-tunes, with its settings.
    records = results.setdefault("variants", []) if args.tag else results["starts"]
    done = {record["name"] for record in records}
    for start in args.starts:
        name = start_name(start) + (f":{args.tag}" if args.tag else "")
        if name in done:
            print(f"{name} already in {args.output}, skipped", flush=True)
            continue
        record = compare_start(campaign, keras, flags, start, args, test)
        record.update(name=name, explore_settings=json.loads(args.explore))
        records.append(record)
        _write(args.output, results)


# Main ---------------------------------------------------------------------

# The exploration the comparison runs: the authors' 10 steps of 0.1, each on
# a fresh sample of 2 batches of 512 from 4,096 training pairs, 3 MINRES
# iterations (docs/pareto.md: the settings measured from seed 0's start).
DEFAULT_EXPLORE = ('{"batch_size": 512, "sample_batches": 2, "minres_iters": 3, "steps": 10, '
                   '"step_size": 0.1, "seed": 0}')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("train", "compare", "stationarity"))
    p.add_argument("--starts", nargs="+", type=parse_start, default=[parse_start("mgda_ub:0")])
    p.add_argument("--epochs", type=int, default=100, help="training epochs of each start (train)")
    p.add_argument("--checkpoints", nargs="*", type=int, default=[],
                   help="also save the weights after these epochs (train)")
    p.add_argument("--runs", default=str(DEFAULT_RUNS), help=f"where models are saved, default {DEFAULT_RUNS}")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"comparison JSON, default {DEFAULT_OUTPUT}")
    p.add_argument("--explore", default=DEFAULT_EXPLORE, help="explore()'s keyword arguments, as JSON")
    p.add_argument("--explore-examples", type=int, default=4096, help="training pairs the exploration uses")
    p.add_argument("--explore-seed", type=int, default=0, help="which training pairs (a seeded draw)")
    p.add_argument("--fine-tune-epochs", nargs="*", type=int, default=[1, 2],
                   help="epochs of each weighted-sum fine-tune (one set of 5 per value; none: no fine-tunes)")
    p.add_argument("--tag", default=None,
                   help="store the exploration as a variant of the start's (another --explore setting; no fine-tunes)")
    p.add_argument("--no-unit-costs", dest="unit_costs", action="store_false",
                   help="skip timing one pass of each kind")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.stage == "train":
        train_starts(args)
    elif args.stage == "compare":
        compare(args)
    else:
        stationarity(args)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")
    main()
