"""MultiMNIST with the authors' protocol: every method, several seeds, one
JSON file that a long campaign appends to and resumes from.

The authors' settings (Sener & Koltun's `train_multi_task.py`, and the first
author's answers in their repository's issues #9 and #14) are the defaults:
the LeNet of `keras_mgda.models.multi_mnist_lenet` with their dropout
(`--dropout-variant authors`), SGD with momentum 0.9, learning rate 0.05
multiplied by 0.85 at every 10th epoch, batch 256, 100 epochs, MGDA's
gradient normalisation "none". The LeNet starts from Keras's default
initialisation unless `--initializer torch` asks for PyTorch's. Keras `fit`
with `shuffle=True` on NumPy arrays (no TensorFlow needed), per-output
sparse cross-entropy on logits.

Data and model selection. 10,000 of MNIST's 60,000 training digits (a fixed
choice, the same in every run) are held out as validation, and the rest and
the held-out digits are paired separately (no digit image appears in both),
so the model trains on 50,000 pairs. After every epoch one `predict` over the
validation and test pairs gives both accuracies. Two selections are recorded:
- honest (`left_acc`, `right_acc`, `best_epoch`): the test accuracies at the
  epoch with the best mean validation accuracy;
- the authors' (`authors_left_acc`, `authors_right_acc`, `authors_epoch`):
  the epoch with the best mean TEST accuracy, since their loader uses MNIST's
  test split as the validation set. Optimistic; reported for comparison only.
With `--val-examples 0` the model trains on all 60,000 pairs, as the authors'
did, and only their selection exists (`"selection": "authors"`).

The seed fixes the pairing of the digits, the model's initialisation
(`keras.utils.set_random_seed`) and the shuffling.

Methods: `single_task` (one LeNet per digit, the same trunk), `uniform`,
`grid` (static weights at `--grid-points` interior points of the 2-task
simplex, one run record each with its `weights`), `uncertainty`,
`gradnorm`, `mgda_ub` (MGDA on the representation with `--normalization`),
`mgda` (exact MGDA on the shared weights, `mode="parameters"`), and every
other weighting of `keras_mgda.weighting.by_name()` by its registry name;
`all` means every one of them.

Output: `{"runs": [...]}`, one record per finished run, written atomically
(a temporary file, then `os.replace`, under a lock so that processes may
share a file). A run already recorded (same method, seed, epochs, backend,
settings and, for the grid, weights) is skipped, so the campaign resumes
where it stopped. Accuracies are fractions. Each record also names its
`environment` (code commit, numpy and backend versions, CPU): one seed
reproduces bit for bit only in one environment.

Usage:
    python benchmarks/multi_mnist.py --methods mgda_ub uniform single_task --seeds 0 1 2
    python benchmarks/multi_mnist.py --methods all --seeds 0 --backend jax
    python benchmarks/multi_mnist.py --methods mgda_ub --epochs 1 --train-examples 2048 \\
        --val-examples 512 --test-examples 512 --output /tmp/quick.json
    python benchmarks/multi_mnist.py --methods all --seeds 0 1 2 --shard 0/4   # 1 of 4 processes
    python benchmarks/multi_mnist.py --list
"""

import argparse
import contextlib
import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist.npz"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "multi_mnist.json"
TASKS = ("left", "right")
# The same 10,000 held-out training digits in every run and for every seed.
VALIDATION_SEED = 20181203

SINGLE_TASK = "single_task"
GRID = "grid"
# The paper's methods, in its order; every other registry name follows.
PAPER_METHODS = (SINGLE_TASK, "uniform", GRID, "uncertainty", "gradnorm", "mgda_ub", "mgda")
# Registry names that the paper's names above already cover (`static` is
# the grid; at equal weights it is `uniform`).
_COVERED = {"mgda", "uniform", "static", "uncertainty", "gradnorm"}
MGDA_METHODS = ("mgda_ub", "mgda")


# Flags --------------------------------------------------------------------


def parse_args(argv=None):
    """The command line.

    Args:
        argv: list of strings, or None for `sys.argv[1:]`.

    Returns:
        An `argparse.Namespace`.
    """
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", nargs="+", default=["mgda_ub"], metavar="NAME",
                   help="methods to run, or 'all' (default: mgda_ub)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="MNIST .npz (keras.datasets.mnist layout), or 'digits' for scikit-learn's "
                   f"bundled digits (tests only); default {DEFAULT_DATA}")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"default {DEFAULT_OUTPUT}")
    p.add_argument("--backend", default=None, choices=("tensorflow", "jax", "torch"),
                   help="sets KERAS_BACKEND before Keras is imported (default: KERAS_BACKEND, else Keras's)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--lr-decay", type=float, default=0.85, help="learning-rate factor at every --lr-decay-every-th epoch"
    )
    p.add_argument("--lr-decay-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--normalization", default="none", choices=("none", "l2", "loss", "loss+"),
                   help="MGDA's gradient normalisation (mgda_ub and mgda only)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--dropout-variant", default="authors", choices=("authors", "keras"))
    p.add_argument("--initializer", default="keras", choices=("keras", "torch"),
                   help="the LeNet's init: Keras's defaults, or PyTorch's (the authors')")
    p.add_argument("--train-examples", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--val-examples", type=int, default=10000,
                   help="training digits held out as validation (0: none, the authors' selection only)")
    p.add_argument("--test-examples", type=int, default=None, help="use only the first N test pairs")
    p.add_argument("--grid-points", type=int, default=5, help="static weight vectors of the grid")
    p.add_argument("--eval-batch-size", type=int, default=2500)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the I-th of every N runs (0-based): N processes can share one --output")
    p.add_argument("--list", action="store_true", help="print the runs in --output and exit")
    args = p.parse_args(argv)
    args.shard = _parse_shard(p, args.shard)
    return args


def _parse_shard(parser, shard):
    if shard is None:
        return None
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        parser.error(f"--shard takes I/N, e.g. 0/4; received {shard!r}")
    if not 0 <= index < count:
        parser.error(f"--shard I/N needs 0 <= I < N; received {shard!r}")
    return index, count


def _import_keras(backend):
    """Imports Keras on `backend`, or checks that it already runs on it (a
    process cannot switch backends once Keras is imported)."""
    if backend is not None:
        if "keras" in sys.modules:
            current = sys.modules["keras"].backend.backend()
            if current != backend:
                raise SystemExit(
                    f"--backend {backend}: Keras is already imported on {current} in this process."
                )
        os.environ["KERAS_BACKEND"] = backend
    import keras

    return keras


# Methods ------------------------------------------------------------------


def method_names():
    """Every method name `--methods` accepts, in the order `all` runs them.

    Returns:
        A list of names: the paper's methods, then the other weightings of
        `keras_mgda.weighting.by_name()`.
    """
    import keras_mgda as km

    others = sorted(set(km.weighting.by_name()) - _COVERED)
    return list(PAPER_METHODS) + others


def resolve_methods(names):
    """Expands `all` and checks the names.

    Args:
        names: list of method names, possibly with `"all"`.

    Returns:
        The list of methods to run, without repeats, in the given order.
    """
    known = method_names()
    chosen = []
    for name in names:
        for method in known if name == "all" else [name]:
            if method not in known:
                raise SystemExit(f"Unknown method {method!r}; choose from: all, {', '.join(known)}.")
            if method not in chosen:
                chosen.append(method)
    return chosen


def grid_weights(points):
    """The grid's static weight vectors: `points` interior points of the
    2-task simplex, evenly spaced (the vertices would leave one head
    untrained).

    Args:
        points: int >= 1.

    Returns:
        A list of `{"left": w, "right": 1 - w}`, left weight increasing.
    """
    weights = []
    for k in range(1, points + 1):
        left = round(k / (points + 1), 6)
        weights.append({"left": left, "right": round(1.0 - left, 6)})
    return weights


def make_weighting(method, args, weights=None):
    """The `keras_mgda.weighting` object a method name stands for.

    Args:
        method: a name from `method_names()` other than `single_task`.
        args: the parsed flags (MGDA's normalisation).
        weights: the static weights of a grid run.

    Returns:
        A `keras_mgda.weighting.Weighting`.
    """
    import keras_mgda as km

    if method == GRID:
        return km.weighting.Static(weights)
    if method == "mgda_ub":
        return km.weighting.MGDA(normalization=args.normalization, mode="representation")
    if method == "mgda":
        return km.weighting.MGDA(normalization=args.normalization, mode="parameters")
    try:
        return km.weighting.by_name()[method]()
    except TypeError as error:
        raise SystemExit(
            f"Method {method} needs constructor arguments this script does not pass ({error})."
        ) from error


# Runs and the results file ---------------------------------------------------


def settings(args, method):
    """The settings that identify a run besides method, seed, epochs and
    backend (a change in any of them is a new run)."""
    run_settings = {
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "lr_decay_every": args.lr_decay_every,
        "batch_size": args.batch_size,
        "momentum": args.momentum,
        # Only MGDA reads it: other methods do not rerun when it changes.
        "normalization": args.normalization if method in MGDA_METHODS else None,
        "dropout": args.dropout,
        "dropout_variant": args.dropout_variant,
        "data": "digits" if args.data == "digits" else os.path.basename(args.data),
        "train_examples": args.train_examples,
        "val_examples": args.val_examples,
        "test_examples": args.test_examples,
    }
    # Named only when not the default, so the records made before the flag
    # existed keep their identity and a resumed campaign skips them.
    if args.initializer != "keras":
        run_settings["initializer"] = args.initializer
    return run_settings


def plan(args, backend):
    """Every run the flags ask for, seeds outermost (so that seed 0 of every
    method finishes first), as identity dicts.

    Returns:
        A list of dicts with `method`, `seed`, `epochs`, `backend`,
        `settings` and, for grid runs, `weights`.
    """
    runs = []
    for seed in args.seeds:
        for method in resolve_methods(args.methods):
            for weights in grid_weights(args.grid_points) if method == GRID else [None]:
                run = {"method": method, "seed": seed, "epochs": args.epochs, "backend": backend,
                       "settings": settings(args, method)}
                if weights is not None:
                    run["weights"] = weights
                runs.append(run)
    if args.shard is not None:
        index, count = args.shard
        runs = runs[index::count]
    return runs


IDENTITY = ("method", "seed", "epochs", "backend", "settings", "weights")


def identity(run):
    """The part of a record that says which run it is, as a JSON string."""
    return json.dumps({key: run.get(key) for key in IDENTITY}, sort_keys=True)


def load_results(path):
    """The results file's content, `{"runs": []}` when it does not exist."""
    if not os.path.exists(path):
        return {"runs": []}
    with open(path) as handle:
        return json.load(handle)


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock beside `path` (POSIX), so that several processes can
    append to one results file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_record(path, record):
    """Appends one run to the results file atomically: a crash leaves the old
    file or the new one, never half of one.

    Returns:
        False when an equal run was already there (another process), else True.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with _locked(path):
        results = load_results(path)
        if identity(record) in {identity(run) for run in results["runs"]}:
            return False
        results["runs"].append(record)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".multi_mnist.", suffix=".json")
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(results, stream, indent=1)
                stream.write("\n")
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
    return True


# Data -----------------------------------------------------------------------


def _first(arrays, count):
    if count is None:
        return arrays
    images, labels = arrays
    return images[:count], {task: values[:count] for task, values in labels.items()}


def holdout_indices(count, val_examples):
    """The training digits kept for training and those held out as
    validation: a fixed choice, the same for every seed and run.

    Args:
        count: number of digits in MNIST's training split.
        val_examples: how many to hold out.

    Returns:
        `(kept, held_out)`: sorted int arrays that partition `range(count)`.
    """
    order = np.random.default_rng(VALIDATION_SEED).permutation(count)
    return np.sort(order[val_examples:]), np.sort(order[:val_examples])


def load_data(args, seed):
    """Training, validation and test pairs for one seed.

    Args:
        args: the parsed flags (data source and sizes).
        seed: fixes the pairing.

    Returns:
        `{"train": (x, y), "val": (x, y) or None, "test": (x, y)}`, x float32
        (N, 28, 28, 1), y `{"left": int32 (N,), "right": int32 (N,)}`.
    """
    # The module, not the function of the same name that the package exports.
    data = importlib.import_module("keras_mgda.datasets.multi_mnist")
    source = args.data
    if source != "digits" and not os.path.exists(source):
        raise SystemExit(
            f"No MNIST at {source!r}: pass --data PATH (an .npz in the keras.datasets.mnist layout), "
            "or --data digits for scikit-learn's bundled digits (quick checks only)."
        )
    images, labels = data.load_mnist_arrays("train", source)
    if not 0 <= args.val_examples < len(images):
        raise SystemExit(f"--val-examples must be in [0, {len(images)}); received {args.val_examples}.")
    kept, held_out = holdout_indices(len(images), args.val_examples)

    def paired(indices, stream):
        # Uniform partners with replacement, as `make_pairs` draws them, from
        # the same digits only; stream 0 is the training split's, 1 the test
        # split's, 2 (a stream of its own) the held-out digits'.
        digits, digit_labels = images[indices], labels[indices]
        rng = np.random.default_rng([int(seed), stream])
        partners = rng.integers(0, len(digits), size=len(digits))
        canvases = data.overlay(digits, digits[partners])
        return data.normalize(canvases), {"left": digit_labels, "right": digit_labels[partners]}

    splits = {"train": _first(paired(kept, 0), args.train_examples)}
    splits["val"] = paired(held_out, 2) if args.val_examples else None
    splits["test"] = _first(data.multi_mnist_arrays("test", source, seed=seed), args.test_examples)
    return splits


# Training -------------------------------------------------------------------


def _accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def make_epoch_callback(keras, tasks, splits, run_name, args):
    """A callback that times the training part of each epoch, then evaluates
    validation and test with one `predict` and prints one line.

    Args:
        keras: the Keras module.
        tasks: the tasks this model predicts.
        splits: the output of `load_data`.
        run_name: printed at the start of each line.
        args: the parsed flags.

    Returns:
        A `keras.callbacks.Callback` whose `history` lists one dict per epoch.
    """
    val = splits["val"]
    # One array to predict on: validation then test, concatenated once.
    parts = [val[0]] if val is not None else []
    eval_x = np.concatenate(parts + [splits["test"][0]]) if parts else splits["test"][0]
    num_val = 0 if val is None else len(val[0])

    class EpochEvaluation(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            train_seconds = time.perf_counter() - self._start
            start = time.perf_counter()
            logits = self.model.predict(eval_x, batch_size=args.eval_batch_size, verbose=0)
            entry = {"epoch": epoch + 1}
            for task in tasks:
                if val is not None:
                    entry[f"val_{task}_acc"] = _accuracy(logits[task][:num_val], val[1][task])
                entry[f"test_{task}_acc"] = _accuracy(logits[task][num_val:], splits["test"][1][task])
            entry["loss"] = _float(logs.get("loss"))
            for task in tasks:
                # A single-output model logs its task's loss as "loss" only.
                own = logs.get("loss") if len(tasks) == 1 else None
                entry[f"{task}_loss"] = _float(logs.get(f"{task}_loss", own))
                entry[f"{task}_alpha"] = _float(logs.get(f"{task}_alpha"))
            # float32 in the optimizer: 7 digits say it without the noise.
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            entry["lr"] = float(f"{lr:.7g}")
            entry["train_seconds"] = round(train_seconds, 3)
            entry["eval_seconds"] = round(time.perf_counter() - start, 3)
            self.history.append(entry)
            print(_epoch_line(run_name, entry, tasks, args.epochs), flush=True)

    return EpochEvaluation()


def _float(value):
    return None if value is None else float(value)


def _epoch_line(run_name, entry, tasks, epochs):
    def accuracies(prefix):
        values = [entry.get(f"{prefix}_{task}_acc") for task in tasks]
        if any(v is None for v in values):
            return "-"
        return "/".join(f"{100 * v:.2f}" for v in values)

    alphas = [entry.get(f"{task}_alpha") for task in tasks]
    alpha = "/".join(f"{a:.3f}" for a in alphas) if all(a is not None for a in alphas) else "-"
    return (
        f"{run_name} epoch {entry['epoch']}/{epochs}: val {accuracies('val')} test {accuracies('test')} "
        f"loss {entry['loss']:.4f} alpha {alpha} lr {entry['lr']:.5g} {entry['train_seconds']:.1f}s"
    )


def _compile(keras, model, args, tasks):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.SGD(args.lr, momentum=args.momentum),
        loss={task: loss for task in tasks},
        metrics={task: ["accuracy"] for task in tasks},
    )


def _schedule(keras, args):
    # The authors multiply the rate by 0.85 at the start of epochs 10, 20,
    # ... (1-based): `(epoch + 1) % 10 == 0` in their loop.
    return keras.callbacks.LearningRateScheduler(
        lambda epoch: args.lr * args.lr_decay ** ((epoch + 1) // args.lr_decay_every)
    )


def _fit(keras, model, tasks, splits, run_name, args):
    """Fits one model and returns its per-epoch history (list of dicts)."""
    x, y = splits["train"]
    evaluation = make_epoch_callback(keras, tasks, splits, run_name, args)
    model.fit(
        x, {task: y[task] for task in tasks}, batch_size=args.batch_size, epochs=args.epochs,
        shuffle=True, callbacks=[_schedule(keras, args), evaluation], verbose=0,
    )
    return evaluation.history


def _build(args, weighting):
    import keras_mgda as km

    return km.models.multi_mnist_lenet(
        weighting=weighting, dropout=args.dropout, dropout_variant=args.dropout_variant,
        initializer=args.initializer,
    )


def train(keras, run, splits, args):
    """Trains one run and returns its history: one dict per epoch with the
    validation and test accuracies of both tasks."""
    import keras_mgda as km

    name = f"{run['method']}" + (f" {run['weights']}" if "weights" in run else "") + f" seed {run['seed']}"
    keras.utils.set_random_seed(run["seed"])
    if run["method"] != SINGLE_TASK:
        model = _build(args, make_weighting(run["method"], args, run.get("weights")))
        _compile(keras, model, args, TASKS)
        return _fit(keras, model, TASKS, splits, name, args)
    # Two single-task models: the same trunk, each with one head, plain Keras.
    singles = km.single_task_models(_build(args, km.weighting.Uniform()))
    histories = {}
    for task in TASKS:
        _compile(keras, singles[task], args, (task,))
        histories[task] = _fit(keras, singles[task], (task,), splits, f"{name} ({task} only)", args)
    return _merge_single_task(histories)


def _merge_single_task(histories):
    """One history from the single-task models' (each task's columns from
    its own model; the loss is their sum)."""
    merged = []
    for entries in zip(*(histories[task] for task in TASKS)):
        entry = {"epoch": entries[0]["epoch"], "loss": sum(e["loss"] for e in entries)}
        for task, own in zip(TASKS, entries):
            for key, value in own.items():
                if key.startswith(("val_", "test_", f"{task}_")):
                    entry[key] = value
        entry["lr"] = entries[0]["lr"]
        entry["train_seconds"] = round(sum(e["train_seconds"] for e in entries), 3)
        entry["eval_seconds"] = round(sum(e["eval_seconds"] for e in entries), 3)
        merged.append(entry)
    return merged


# Model selection ----------------------------------------------------------


def _best_epoch(history, prefix, tasks):
    """The 1-based epoch with the highest mean accuracy over `tasks` (the
    first one on ties)."""
    scores = [np.mean([entry[f"{prefix}_{task}_acc"] for task in tasks]) for entry in history]
    return int(np.argmax(scores)) + 1


def select(history, method, has_validation):
    """The honest and the authors' model selection.

    The honest one takes the test accuracies at the epoch with the best mean
    validation accuracy; the authors' takes the best mean test epoch. The two
    single-task models are independent checkpoints: each task's epoch is
    chosen on that task alone, and the epochs are dicts `{task: epoch}`.

    Args:
        history: one dict per epoch, as `train` returns.
        method: the method's name.
        has_validation: whether the history has validation accuracies.

    Returns:
        A dict of the record's selection fields.
    """
    groups = [(task,) for task in TASKS] if method == SINGLE_TASK else [TASKS]

    def choose(prefix):
        accuracies, epochs = {}, {}
        for group in groups:
            epoch = _best_epoch(history, prefix, group)
            for task in group:
                accuracies[task] = history[epoch - 1][f"test_{task}_acc"]
                epochs[task] = epoch
        epoch = epochs if method == SINGLE_TASK else epochs[TASKS[0]]
        return accuracies, epoch

    authors, authors_epoch = choose("test")
    fields = {}
    if has_validation:
        honest, best_epoch = choose("val")
        fields.update({"selection": "honest", "best_epoch": best_epoch})
    else:
        honest, best_epoch = authors, authors_epoch
        fields.update({"selection": "authors", "best_epoch": best_epoch})
    for task in TASKS:
        fields[f"{task}_acc"] = honest[task]
    for task in TASKS:
        fields[f"authors_{task}_acc"] = authors[task]
    fields["authors_epoch"] = authors_epoch
    return fields


# The packages whose builds decide a run's floating-point rounding.
BACKEND_PACKAGES = {"torch": ("torch",), "jax": ("jax", "jaxlib"), "tensorflow": ("tensorflow",), "numpy": ()}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{model} ({'avx512f' if 'avx512f' in flags else 'no avx512f'})"


@functools.cache
def _git_commit():
    # The checkout of the keras_mgda that runs, which need not be this
    # script's (an editable install imported from another worktree). Cached:
    # `main` asks first, so a checkout that moves during a campaign does not
    # relabel the runs that the imported code makes.
    import keras_mgda

    folder = Path(keras_mgda.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        return None
    return commit + ("+dirty" if dirty else "")


def environment(backend):
    """What a run's numbers depend on beyond its settings: the code's commit,
    the package versions and the CPU. The same seed and settings give
    bit-identical runs in one environment and, in two, runs up to 2.6
    points apart at epoch 2 (measured on MultiMNIST: the float rounding of
    two builds, amplified by training), so a record says where it was
    made."""
    packages = ("numpy",) + BACKEND_PACKAGES.get(backend, ())
    versions = {name: importlib.metadata.version(name) for name in packages}
    return {"commit": _git_commit(), "python": platform.python_version(), "packages": versions,
            "cpu": _cpu_model()}


def make_record(run, history, wall_seconds, has_validation, keras):
    """The JSON record of a finished run."""
    import keras_mgda as km

    train_seconds = [entry["train_seconds"] for entry in history]
    record = {"method": run["method"], "seed": run["seed"], "epochs": run["epochs"], "backend": run["backend"]}
    record.update(select(history, run["method"], has_validation))
    record.update({
        "train_seconds": round(sum(train_seconds), 2),
        # The median: the first epoch also compiles the step.
        "seconds_per_epoch": round(statistics.median(train_seconds), 3),
        "eval_seconds": round(sum(entry["eval_seconds"] for entry in history), 2),
        "wall_seconds": round(wall_seconds, 2),
        "settings": run["settings"],
    })
    if "weights" in run:
        record["weights"] = run["weights"]
    record.update({
        "keras": keras.__version__,
        "keras_mgda": km.__version__,
        "environment": environment(run["backend"]),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "history": history,
    })
    return record


# Main -----------------------------------------------------------------------


def list_runs(path, out=sys.stdout):
    """Prints one line per run of the results file."""
    runs = load_results(path)["runs"]
    print(f"{len(runs)} runs in {path}", file=out)
    for run in runs:
        weights = run.get("weights")
        method = run["method"] + (f" {weights['left']:.3f}/{weights['right']:.3f}" if weights else "")
        settings_ = run.get("settings", {})
        print(
            f"{method:<22} seed {run['seed']:<3} {run['epochs']:>3} epochs {run['backend']:<10} "
            f"{run.get('selection', '?')}: {100 * run['left_acc']:.2f}/{100 * run['right_acc']:.2f} "
            f"(epoch {run.get('best_epoch')})  authors': {100 * run['authors_left_acc']:.2f}/"
            f"{100 * run['authors_right_acc']:.2f}  {run['seconds_per_epoch']:.1f} s/epoch  "
            f"{settings_.get('dropout_variant', '?')} dropout",
            file=out,
        )


def _run_line(record):
    weights = record.get("weights")
    name = record["method"] + (f" {weights['left']:.3f}/{weights['right']:.3f}" if weights else "")
    authors = (
        f"authors' (best test epoch) {100 * record['authors_left_acc']:.2f}/"
        f"{100 * record['authors_right_acc']:.2f} (epoch {record['authors_epoch']})"
    )
    honest = ""
    if record["selection"] == "honest":
        honest = (
            f"honest {100 * record['left_acc']:.2f}/{100 * record['right_acc']:.2f} "
            f"(epoch {record['best_epoch']}), "
        )
    return f"done {name} seed {record['seed']}: {honest}{authors}, {record['seconds_per_epoch']:.1f} s/epoch"


def main(argv=None):
    """Runs the campaign the flags describe.

    Args:
        argv: list of flags, or None for `sys.argv[1:]`.

    Returns:
        The list of records written by this call (runs already in the file
        are skipped and not returned).

    Example:

    ```python
    main(["--methods", "mgda_ub", "uniform", "--seeds", "0", "1", "2"])
    ```
    """
    args = parse_args(argv)
    if args.list:
        list_runs(args.output)
        return []
    keras = _import_keras(args.backend)
    backend = keras.backend.backend()
    _git_commit()  # the commit of the code imported now
    runs = plan(args, backend)
    done = {identity(run) for run in load_results(args.output)["runs"]}
    todo = [run for run in runs if identity(run) not in done]
    print(f"multi_mnist: {len(runs)} runs asked, {len(runs) - len(todo)} already in {args.output}; "
          f"keras {keras.__version__} on {backend}", flush=True)
    written = []
    splits_seed, splits = None, None
    for run in todo:
        if run["seed"] != splits_seed:  # runs are ordered by seed: build each seed's data once
            splits, splits_seed = load_data(args, run["seed"]), run["seed"]
        start = time.perf_counter()
        history = train(keras, run, splits, args)
        record = make_record(run, history, time.perf_counter() - start, splits["val"] is not None, keras)
        if append_record(args.output, record):
            written.append(record)
        print(_run_line(record), flush=True)
    return written


if __name__ == "__main__":
    main()
