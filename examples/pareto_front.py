"""Continuous Pareto exploration on MultiMNIST against the weighted-sum
baseline (Ma, Du & Matusik, ICML 2020, their MultiMNIST comparison).

1. The start: MGDA-UB on MultiMNIST (the authors' LeNet and dropout, SGD
   with momentum 0.9, learning rate 0.05, batch 256, normalisation "none"),
   trained here for --epochs, or loaded with --weights from a
   `.weights.h5` (`benchmarks/pareto_multi_mnist.py train` writes
   converged 100-epoch ones).
2. Explore its Pareto set with `keras_mgda.pareto.explore`, one direction
   per task (beta = e_left, e_right), on a subset of the training set;
   `explore` warns when the start is far from Pareto-stationary.
3. The weighted-sum baseline on a grid of --grid static weightings
   (`keras_mgda.weighting.Static`): trained from the start's initial
   weights for as long as the start, or, with --weights, fine-tuned from
   the start for --fine-tune-epochs.
4. Evaluate every model of both sets on the test set; print what each set
   cost (example-gradients, example-HVPs, seconds), its hypervolume in loss
   and error space against the same reference point, and the ratios of the
   explored set's numbers to the weighted sum's; save the figure and the
   numbers (results.json) into --output.

Costs are counted per example: a training epoch is N example-gradients;
an exploration's passes count the examples they ran over (its sample's, or
all the data's), each MINRES iteration one example-HVP.

Usage:
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python examples/pareto_front.py
    KERAS_BACKEND=torch python examples/pareto_front.py --epochs 3 --train-examples 20000 \\
        --explore-examples 512 --figure /tmp/pareto_front.png
    # from a converged start, fresh samples of 2 x 512 of 4,096 examples per step:
    KERAS_BACKEND=torch python examples/pareto_front.py \\
        --weights runs/pareto_multi_mnist/mgda_ub-seed0/model.weights.h5 --explore-examples 4096 \\
        --explore-batch-size 512 --sample-batches 2 --minres-iters 3 --steps 16 --step-size 0.25 \\
        --fine-tune-epochs 1
"""

import argparse
import json
import os
import time

import _common  # noqa: F401  (sets the default backend before Keras loads)
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mgda as km  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("left", "right")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "mnist.npz"),
                   help="MNIST .npz (keras.datasets.mnist layout)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every training run")
    p.add_argument("--weights", default=None, help="a .weights.h5 to start from instead of training")
    p.add_argument("--fine-tune-epochs", type=int, default=1,
                   help="with --weights: epochs of each weighted-sum fine-tune from the start")
    p.add_argument("--fine-tune-lr", type=float, default=0.05 * 0.85**10,
                   help="with --weights: the fine-tunes' learning rate (default: the authors' schedule's last)")
    p.add_argument("--dropout-variant", default="authors", choices=["authors", "keras"])
    p.add_argument("--train-examples", type=int, default=None, help="first N training examples (default all)")
    p.add_argument("--test-examples", type=int, default=None, help="first N test examples (default all)")
    p.add_argument("--explore-examples", type=int, default=1024, help="training examples the exploration averages")
    p.add_argument("--explore-batch-size", type=int, default=1024, help="batch size of the exploration's averages")
    p.add_argument("--sample-batches", type=int, default=None,
                   help="average each step over this many batches drawn afresh (default: all of them)")
    p.add_argument("--steps", type=int, default=10, help="exploration steps per direction")
    p.add_argument("--step-size", type=float, default=0.1)
    p.add_argument("--minres-iters", type=int, default=50)
    p.add_argument("--damping", type=float, default=0.1)
    p.add_argument("--grid", type=int, default=5, help="weighted-sum points (interior of the simplex)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/pareto_front")
    p.add_argument("--figure", default=None, help="figure path (default OUTPUT/pareto_front.png)")
    return p.parse_args(argv)


def load(args):
    x, y = km.datasets.multi_mnist_arrays("train", source=args.data, seed=args.seed)
    x_test, y_test = km.datasets.multi_mnist_arrays("test", source=args.data, seed=args.seed)
    cut = lambda arrays, n: keras.tree.map_structure(lambda a: a[:n], arrays)
    x, y = cut((x, y), args.train_examples)
    x_test, y_test = cut((x_test, y_test), args.test_examples)
    explore = cut((x, y), args.explore_examples)
    return (x, y), explore, (x_test, y_test)


def make_model(weighting, args, lr=None, weights=None):
    """The LeNet, with `weights` (a .weights.h5) loaded before compiling
    (the file's optimizer slots are not wanted), compiled."""
    model = km.models.multi_mnist_lenet(weighting=weighting, dropout_variant=args.dropout_variant)
    if weights:
        model.load_weights(weights)
    model.compile(
        keras.optimizers.SGD(args.lr if lr is None else lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics={task: ["accuracy"] for task in TASKS},
    )
    return model


def copy_weights(source, target):
    """The same start: every layer's weights, by layer name (the models'
    weightings differ and may own variables of their own)."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def train(model, data, args, epochs=None):
    """Fits `model` (--epochs, or `epochs`); returns the seconds it took."""
    keras.utils.set_random_seed(args.seed)  # the same shuffles and dropout masks
    started = time.perf_counter()
    model.fit(*data, batch_size=args.batch_size, epochs=epochs or args.epochs, shuffle=True, verbose=0)
    return time.perf_counter() - started


def test_scores(model, test):
    """(losses (T,), accuracies (T,)) on the test set."""
    scores = model.evaluate(*test, batch_size=1024, verbose=0, return_dict=True)
    return (np.array([scores[f"{t}_loss"] for t in TASKS]), np.array([scores[f"{t}_accuracy"] for t in TASKS]))


def explore(model, explore_data, test, args):
    """The explored front, its points' test scores and its cost."""
    front = km.pareto.explore(model, *explore_data, steps=args.steps, step_size=args.step_size,
                              minres_iters=args.minres_iters, damping=args.damping,
                              batch_size=args.explore_batch_size, sample_batches=args.sample_batches,
                              seed=args.seed)
    on_test = km.pareto.ParetoFront(front.task_names, front.directions)
    for i in range(len(front)):
        front.restore(i)
        losses, accuracies = test_scores(model, test)
        metrics = {f"{t}_accuracy": float(a) for t, a in zip(TASKS, accuracies)}
        on_test.add(losses, metrics, front.weights[i], front.direction_index[i], front.step_index[i])
    front.restore(0)
    cost = front.cost
    on_test.cost = {
        "seconds": cost["seconds"],
        # Backward and forward-mode passes: each about one gradient's cost.
        "example_gradients": cost["gradient_examples"] + cost["jvp_examples"],
        "example_hvps": cost["hvp_examples"],
        "example_forwards": cost["evaluation_examples"],
        "minres_iterations": cost["minres_iterations"],
    }
    return front, on_test


def weighted_sum(init, train_data, test, args, epochs=None, lr=None):
    """The weighted-sum set: one model per static weighting, each trained
    from `init`'s weights for `epochs` (default --epochs) at `lr`."""
    points, seconds = [], 0.0
    for w in np.linspace(0.0, 1.0, args.grid + 2)[1:-1]:
        weights = [float(w), float(1.0 - w)]
        model = make_model(km.weighting.Static(weights), args, lr=lr)
        copy_weights(init, model)
        seconds += train(model, train_data, args, epochs=epochs)
        losses, accuracies = test_scores(model, test)
        points.append({"weights": weights, "losses": losses.tolist(), "accuracies": accuracies.tolist()})
        print(f"weighted sum {weights}: test losses {np.round(losses, 4)}, accuracies {np.round(accuracies, 4)}")
    examples = len(train_data[0]) * (epochs or args.epochs) * args.grid
    return points, {"seconds": seconds, "example_gradients": examples, "example_hvps": 0}


def hypervolumes(explored, ws_points):
    """Both sets' hypervolumes in loss and error space, against one
    reference point per space: 1.1 times the worst value of either set."""
    sets = {
        "loss": (explored.losses, np.array([p["losses"] for p in ws_points])),
        "error": (1.0 - explored.metric_values("accuracy"), 1.0 - np.array([p["accuracies"] for p in ws_points])),
    }
    out = {}
    for space, (ours, theirs) in sets.items():
        reference = 1.1 * np.max(np.concatenate([ours, theirs]), axis=0)
        out[space] = {
            "reference": reference.tolist(),
            "explored": km.pareto.hypervolume(ours, reference),
            "weighted_sum": km.pareto.hypervolume(theirs, reference),
            "mgda_point_alone": km.pareto.hypervolume(ours[:1], reference),
        }
    return out


def figure(explored, ws_points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    explored.plot(ax=left)
    explored.plot(ax=right, metric="accuracy")
    ws_losses = np.array([p["losses"] for p in ws_points])
    ws_accuracies = np.array([p["accuracies"] for p in ws_points])
    left.plot(ws_losses[:, 0], ws_losses[:, 1], "s", color="gray", label="weighted sum")
    right.plot(ws_accuracies[:, 0], ws_accuracies[:, 1], "s", color="gray", label="weighted sum")
    left.set_title("test loss")
    right.set_title("test accuracy")
    for ax in (left, right):
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(results):
    """Prints both sets' costs and hypervolumes, and the explored set's
    numbers as ratios to the weighted sum's (no verdict: the numbers)."""
    start, ours, theirs = results["start_training"], results["explored"]["cost"], results["weighted_sum"]["cost"]
    print("\ncost                 example-gradients   example-HVPs   seconds   points")
    print(f"start's training     {start['example_gradients']:17,d}   {0:12,d}   {start['seconds']:7.1f}        1")
    print(f"exploration          {ours['example_gradients']:17,d}   {ours['example_hvps']:12,d}   "
          f"{ours['seconds']:7.1f}   {results['explored']['points'] - 1:6d}")
    print(f"weighted sum         {theirs['example_gradients']:17,d}   {0:12,d}   {theirs['seconds']:7.1f}   "
          f"{results['weighted_sum']['points']:6d}")
    for space, hv in results["hypervolume"].items():
        print(f"hypervolume ({space} space, reference {np.round(hv['reference'], 4).tolist()}): explored "
              f"{hv['explored']:.5f}, weighted sum {hv['weighted_sum']:.5f} "
              f"(start alone {hv['mgda_point_alone']:.5f}); "
              f"explored / weighted sum = {hv['explored'] / hv['weighted_sum']:.3f}")
    print(f"seconds: exploration / weighted sum = {ours['seconds'] / theirs['seconds']:.3f}")


def start_model(args, train_data):
    """The start (trained here, or loaded), a copy of its initial weights for
    the weighted sum, and its training cost."""
    keras.utils.set_random_seed(args.seed)
    model = make_model(km.weighting.MGDA(normalization="none"), args, weights=args.weights)
    init = make_model(km.weighting.MGDA(normalization="none"), args)
    if args.weights:
        copy_weights(model, init)  # the fine-tunes start from the start itself
        return model, init, {"seconds": 0.0, "example_gradients": 0, "weights": args.weights}
    copy_weights(model, init)  # the initial weights every run shares
    seconds = train(model, train_data, args)
    return model, init, {"seconds": seconds, "example_gradients": len(train_data[0]) * args.epochs}


def main():
    args = parse_args()
    os.makedirs(args.output, exist_ok=True)
    train_data, explore_data, test = load(args)
    model, init, start_cost = start_model(args, train_data)
    losses, accuracies = test_scores(model, test)
    print(f"start: test losses {np.round(losses, 4)}, accuracies {np.round(accuracies, 4)}")
    front, on_test = explore(model, explore_data, test, args)
    if args.weights:
        ws_points, ws_cost = weighted_sum(init, train_data, test, args, args.fine_tune_epochs, args.fine_tune_lr)
    else:
        ws_points, ws_cost = weighted_sum(init, train_data, test, args)
    results = {
        "settings": vars(args), "runtime": _common.runtime(), "start_training": start_cost,
        "explored": {"points": len(on_test), "test_losses": on_test.losses.tolist(),
                     "test_accuracies": on_test.metric_values("accuracy").tolist(),
                     "direction_index": on_test.direction_index.tolist(), "damping": front.damping.tolist(),
                     "stationarity": front.stationarity.tolist(), "stopped": front.stopped, "cost": on_test.cost},
        "weighted_sum": {"points": len(ws_points), "runs": ws_points, "cost": ws_cost},
        "hypervolume": hypervolumes(on_test, ws_points),
    }
    report(results)
    path = args.figure or os.path.join(args.output, "pareto_front.png")
    figure(on_test, ws_points, path)
    front.save(os.path.join(args.output, "front.npz"))
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"figure: {path}; results: {os.path.join(args.output, 'results.json')}")


if __name__ == "__main__":
    main()
