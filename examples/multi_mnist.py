"""MultiMNIST with MGDA-UB: the paper's first benchmark, in one command.

Two overlapping handwritten digits per image (the authors' protocol: a 36x36
canvas, left digit at (0, 0), right digit at (6, 6), resized to 28x28); one
task reads the left digit, one the right. The authors' LeNet and settings
(their `train_multi_task.py`, and the first author's answers in their
repository's issues #9 and #14): SGD with momentum 0.9, learning rate 0.05
multiplied by 0.85 every 10 epochs, batch 256, 100 epochs, MGDA-UB with
gradient normalisation "none" (loss+ is their CelebA setting). Every epoch
is evaluated on the 10000 test images; the end writes results.json (test
accuracies, task weights, settings) and history.csv (Keras's History) into
--output.

Data: --data PATH (an .npz in the keras.datasets.mnist layout), else Keras's
cached ~/.keras/datasets/mnist.npz, else tensorflow-datasets' mnist (prepared
or downloadable). With none of them (no internet, no local MNIST) it trains
on scikit-learn's bundled 8x8 digits overlaid the same way, and says so.

(For the paper's table, with model selection on a held-out validation set
and several seeds, see benchmarks/multi_mnist.py.)

Usage:
    python examples/multi_mnist.py                      # MGDA-UB, paper settings
    python examples/multi_mnist.py --method uniform     # the uniform baseline
    python examples/multi_mnist.py --method single      # single-task baselines
    python examples/multi_mnist.py --baseline runs/multi_mnist-single/results.json
    python examples/multi_mnist.py --data ~/mnist.npz --epochs 10 --output runs/mm10
"""

import os
import socket

import _common  # noqa: F401  (sets the default backend before Keras loads)
import keras  # noqa: E402

import keras_mgda as km  # noqa: E402

KERAS_CACHE = os.path.join(os.path.expanduser("~"), ".keras", "datasets", "mnist.npz")


def _can_reach(host="storage.googleapis.com", port=443, timeout=3.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_source(data):
    """The MNIST source to use and a description of it."""
    if data:
        return data, ("scikit-learn digits" if data == "digits" else f"MNIST from {data}")
    if os.path.exists(KERAS_CACHE):
        return KERAS_CACHE, f"MNIST from {KERAS_CACHE}"
    try:
        import tensorflow_datasets as tfds

        if tfds.builder("mnist").is_prepared() or _can_reach():
            tfds.load("mnist", split="test[:1]")  # prepares it, or fails here
            return None, "MNIST from tensorflow-datasets"
    except Exception:  # no tensorflow-datasets, no internet, a failed download
        pass
    print(
        "Notice: no MNIST here (no --data, no ~/.keras/datasets/mnist.npz, "
        "tensorflow-datasets could not get it): training on scikit-learn's bundled "
        "8x8 handwritten digits upscaled to 28x28 and overlaid the same way "
        "(1438 train / 359 test pairs), a stand-in, not the paper's data."
    )
    return "digits", "scikit-learn digits (offline stand-in for MNIST)"


def main():
    p = _common.parser(__doc__, epochs=100, batch_size=256, lr=0.05, output="runs/multi_mnist")
    p.add_argument("--data", default=None, help="MNIST .npz (keras.datasets.mnist layout), or 'digits'")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--dropout", type=float, default=0.5, help="the authors' dropout rate (0 to remove)")
    p.add_argument(
        "--dropout-variant", default="authors", choices=["authors", "keras"],
        help="the authors' unscaled, batch-shared masks (default) or Keras's",
    )
    p.add_argument(
        "--initializer", default="keras", choices=["keras", "torch"],
        help="Keras's default init, or PyTorch's (the authors'; measured level with Keras's)",
    )
    p.add_argument(
        "--normalization", default="none", choices=list(km.solvers.NORMALIZATIONS),
        help="MGDA's gradient normalisation (the authors' MultiMNIST setting: none)",
    )
    args = p.parse_args()
    if args.output == "runs/multi_mnist":
        args.output = f"runs/multi_mnist-{args.method}"

    source, description = choose_source(args.data)
    train = _common.limit(km.datasets.multi_mnist("train", source=source, seed=args.seed), args.train_examples)
    test = _common.limit(km.datasets.multi_mnist("test", source=source, seed=args.seed), args.test_examples)
    train = train.shuffle(60000, seed=args.seed, reshuffle_each_iteration=True).batch(args.batch_size).prefetch(4)
    test = test.batch(1000).prefetch(2)

    def build(weighting):
        if weighting is None:  # MGDA-UB with the MultiMNIST normalisation
            weighting = km.weighting.MGDA(normalization=args.normalization)
        return km.models.multi_mnist_lenet(
            weighting=weighting, dropout=args.dropout, dropout_variant=args.dropout_variant,
            initializer=args.initializer,
        )

    def compile_kwargs():
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return {
            "optimizer": keras.optimizers.SGD(args.lr, momentum=args.momentum),
            "loss": {"left": loss, "right": loss},
            "metrics": {"left": ["accuracy"], "right": ["accuracy"]},
        }

    # The authors multiply the learning rate by 0.85 at the start of epochs 10, 20, ...
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: args.lr * 0.85 ** ((epoch + 1) // 10))
    results = _common.run(
        args, "multi_mnist", build, compile_kwargs, train, test,
        primary={"left": ("accuracy", False), "right": ("accuracy", False)},
        callbacks=[schedule],
        info={"data": description, "optimizer": f"SGD(momentum={args.momentum}), lr x0.85 every 10 epochs"},
        summary=lambda accuracy: {"mean_accuracy": sum(accuracy.values()) / len(accuracy)},
    )
    left, right = results["scores"].get("left"), results["scores"].get("right")
    shown = ", ".join(f"{t} {100 * v:.2f}%" for t, v in (("left", left), ("right", right)) if v is not None)
    print(f"test accuracy: {shown}  (paper, MGDA-UB: left 97.26%, right 95.90%)")


if __name__ == "__main__":
    main()
