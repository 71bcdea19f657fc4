"""Continuous Pareto exploration on MultiMNIST against the weighted-sum
baseline (Ma, Du & Matusik, ICML 2020, their MultiMNIST comparison).

1. Train MGDA-UB on MultiMNIST (the authors' LeNet, SGD with momentum 0.9,
   learning rate 0.05, batch 256, normalisation "none") for a few epochs.
2. Explore its Pareto set with `keras_mgda.pareto.explore`, one direction
   per task (beta = e_left, e_right), on a subset of the training set.
3. Retrain from the same initial weights with static weights
   (`keras_mgda.weighting.Static`) on a grid of `--grid` points: the
   weighted-sum baseline, each run as long as the MGDA-UB one.
4. Evaluate every model of both sets on the test set; print what each set
   cost (gradient evaluations, Hessian-vector products, seconds) and its
   hypervolume in loss space and in error space against the same reference
   point; save the figure (both sets, loss space and accuracy space) and
   the numbers (results.json) into --output.

Costs are counted per example: a training epoch is N example-gradients;
an exploration step's task gradients are T example-gradients per example
(one backward per task), its MINRES iterations one example-HVP each.

Usage:
    KERAS_BACKEND=torch OMP_NUM_THREADS=1 python examples/pareto_front.py
    KERAS_BACKEND=torch python examples/pareto_front.py --epochs 3 --train-examples 20000 \\
        --explore-examples 512 --figure docs/pareto_front.png
    # 10 epochs; each exploration step on a fresh 2 x 512 of 4,096 examples
    # (the setting that meets the hypervolume target in docs/pareto.md):
    KERAS_BACKEND=torch python examples/pareto_front.py --epochs 10 --explore-examples 4096 \\
        --explore-batch-size 512 --sample-batches 2 --minres-iters 3 --steps 16 --step-size 0.25
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


def make_model(weighting, args):
    model = km.models.multi_mnist_lenet(weighting=weighting)
    model.compile(
        keras.optimizers.SGD(args.lr, momentum=0.9),
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


def train(model, data, args):
    """Fits `model`; returns the seconds it took."""
    keras.utils.set_random_seed(args.seed)  # the same shuffles and dropout masks
    started = time.perf_counter()
    model.fit(*data, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0)
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
                              seed=args.seed, verbose=1)
    on_test = km.pareto.ParetoFront(front.task_names, front.directions)
    for i in range(len(front)):
        front.restore(i)
        losses, accuracies = test_scores(model, test)
        metrics = {f"{t}_accuracy": float(a) for t, a in zip(TASKS, accuracies)}
        on_test.add(losses, metrics, front.weights[i], front.direction_index[i], front.step_index[i])
    front.restore(0)
    cost = front.cost
    per_pass = cost["examples_per_pass"]  # all the data, or one step's sample
    on_test.cost = {
        "seconds": cost["seconds"],
        # Backward and forward-mode passes: each about one gradient's cost.
        "example_gradients": (cost["gradient_passes"] + cost["jvp_passes"]) * per_pass,
        "example_hvps": cost["hvp_passes"] * per_pass,
        "example_forwards": cost["evaluation_passes"] * cost["examples"],
        "minres_iterations": cost["minres_iterations"],
    }
    return front, on_test


def weighted_sum(init, train_data, test, args):
    """The weighted-sum set: one model per static weighting."""
    points, seconds = [], 0.0
    for w in np.linspace(0.0, 1.0, args.grid + 2)[1:-1]:
        weights = [float(w), float(1.0 - w)]
        model = make_model(km.weighting.Static(weights), args)
        copy_weights(init, model)
        seconds += train(model, train_data, args)
        losses, accuracies = test_scores(model, test)
        points.append({"weights": weights, "losses": losses.tolist(), "accuracies": accuracies.tolist()})
        print(f"weighted sum {weights}: test losses {np.round(losses, 4)}, accuracies {np.round(accuracies, 4)}")
    examples = len(train_data[0]) * args.epochs * args.grid
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
    mgda, ours, theirs = results["mgda_training"], results["explored"]["cost"], results["weighted_sum"]["cost"]
    print("\ncost                 example-gradients   example-HVPs   seconds   points")
    print(f"MGDA-UB training     {mgda['example_gradients']:17,d}   {0:12,d}   {mgda['seconds']:7.1f}        1")
    print(f"exploration          {ours['example_gradients']:17,d}   {ours['example_hvps']:12,d}   "
          f"{ours['seconds']:7.1f}   {results['explored']['points'] - 1:6d}")
    print(f"weighted sum         {theirs['example_gradients']:17,d}   {0:12,d}   {theirs['seconds']:7.1f}   "
          f"{results['weighted_sum']['points']:6d}")
    for space, hv in results["hypervolume"].items():
        print(f"hypervolume ({space} space, reference {np.round(hv['reference'], 4).tolist()}): explored "
              f"{hv['explored']:.5f}, weighted sum {hv['weighted_sum']:.5f} "
              f"(MGDA point alone {hv['mgda_point_alone']:.5f})")
    ratio = ours["seconds"] / theirs["seconds"]
    inclusive = (ours["seconds"] + mgda["seconds"]) / theirs["seconds"]
    print(f"time: exploration / weighted sum = {ratio:.3f}; (MGDA-UB training + exploration) / weighted sum = "
          f"{inclusive:.3f}")
    better = all(hv["explored"] >= hv["weighted_sum"] for hv in results["hypervolume"].values())
    print(f"target (hypervolume >= weighted sum's in both spaces at <= 1/5 of its time): "
          f"{'met' if better and ratio <= 0.2 else 'NOT met'} (exploration alone); "
          f"{'met' if better and inclusive <= 0.2 else 'NOT met'} (with the MGDA-UB training)")


def main():
    args = parse_args()
    os.makedirs(args.output, exist_ok=True)
    train_data, explore_data, test = load(args)
    keras.utils.set_random_seed(args.seed)
    model = make_model(km.weighting.MGDA(normalization="none"), args)
    init = make_model(km.weighting.MGDA(normalization="none"), args)
    copy_weights(model, init)  # the start every run shares
    mgda_seconds = train(model, train_data, args)
    losses, accuracies = test_scores(model, test)
    print(f"MGDA-UB: test losses {np.round(losses, 4)}, accuracies {np.round(accuracies, 4)} ({mgda_seconds:.0f} s)")
    front, on_test = explore(model, explore_data, test, args)
    ws_points, ws_cost = weighted_sum(init, train_data, test, args)
    results = {
        "settings": vars(args), "runtime": _common.runtime(),
        "mgda_training": {"seconds": mgda_seconds, "example_gradients": len(train_data[0]) * args.epochs},
        "explored": {"points": len(on_test), "test_losses": on_test.losses.tolist(),
                     "test_accuracies": on_test.metric_values("accuracy").tolist(),
                     "direction_index": on_test.direction_index.tolist(), "cost": on_test.cost},
        "weighted_sum": {"points": len(ws_points), "runs": ws_points, "cost": ws_cost},
        "hypervolume": hypervolumes(on_test, ws_points),
    }
    results["explored"]["points_per_second"] = (len(on_test) - 1) / on_test.cost["seconds"]
    results["weighted_sum"]["points_per_second"] = len(ws_points) / ws_cost["seconds"]
    report(results)
    path = args.figure or os.path.join(args.output, "pareto_front.png")
    figure(on_test, ws_points, path)
    front.save(os.path.join(args.output, "front.npz"))
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"figure: {path}; results: {os.path.join(args.output, 'results.json')}")


if __name__ == "__main__":
    main()
