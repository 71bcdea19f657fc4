"""CelebA with MGDA-UB: 40 binary face attributes, one task each.

The authors' setup: 64x64 images, a ResNet-18 trunk shared by 40 linear
heads, Adam with learning rate 5e-4, batch 256, 100 epochs, MGDA-UB with
loss+ normalisation. Validation after every epoch; the test split at the
end. results.json holds every attribute's test error and their mean (the
paper's "average error": 8.25% for MGDA-UB, 9.62% uniform, 8.77% single
task); history.csv holds Keras's History.

Data: tensorflow-datasets' celeb_a in --data (its data directory; default
~/tensorflow_datasets). tensorflow-datasets downloads CelebA from Google
Drive, which often refuses automated downloads: see the celeb_a page of the
tensorflow-datasets catalog for the manual route.

Usage:
    python examples/celeba.py                            # MGDA-UB, paper settings
    python examples/celeba.py --method uniform
    python examples/celeba.py --method single --tasks Smiling Male
    python examples/celeba.py --epochs 1 --train-examples 2560 --test-examples 512
"""

import _common  # noqa: F401  (sets the default backend before Keras loads)
import keras  # noqa: E402

import keras_mgda as km  # noqa: E402


def main():
    p = _common.parser(__doc__, epochs=100, batch_size=256, lr=5e-4, output="runs/celeba")
    p.add_argument("--data", default=None, help="tensorflow-datasets data directory")
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()
    if args.output == "runs/celeba":
        args.output = f"runs/celeba-{args.method}"

    size = (args.image_size, args.image_size)
    try:
        train = km.datasets.celeba("train", data_dir=args.data, image_size=size)
        validation = km.datasets.celeba("validation", data_dir=args.data, image_size=size)
        test = km.datasets.celeba("test", data_dir=args.data, image_size=size)
    except Exception as error:
        raise SystemExit(
            f"Could not load CelebA through tensorflow-datasets ({type(error).__name__}: {error}).\n"
            "It downloads from Google Drive, which needs internet and often refuses "
            "automated downloads; prepare celeb_a by hand (see its page in the "
            "tensorflow-datasets catalog) and pass its data directory as --data."
        ) from error
    train = _common.limit(train, args.train_examples)
    validation = _common.limit(validation, args.test_examples)
    test = _common.limit(test, args.test_examples)
    train = train.shuffle(10000, seed=args.seed, reshuffle_each_iteration=True).batch(args.batch_size).prefetch(4)
    validation = validation.batch(args.batch_size).prefetch(2)
    test = test.batch(args.batch_size).prefetch(2)
    names = km.datasets.CELEBA_ATTRIBUTES

    def build(weighting):
        return km.models.celeba_resnet18(weighting=weighting, input_shape=size + (3,))

    def compile_kwargs():
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        return {
            "optimizer": keras.optimizers.Adam(args.lr),
            "loss": {name: loss for name in names},
            "metrics": {name: [km.metrics.BinaryErrorRate(name="error")] for name in names},
        }

    results = _common.run(
        args, "celeba", build, compile_kwargs, train, test,
        primary={name: ("error", True) for name in names},
        validation=validation,
        info={"data": "tensorflow-datasets celeb_a", "optimizer": "Adam"},
        summary=lambda errors: {"mean_error_percent": 100 * sum(errors.values()) / len(errors)},
    )
    print(f"mean test error over {len(results['scores'])} attributes: "
          f"{results['mean_error_percent']:.2f}%  (paper: MGDA-UB 8.25%, uniform 9.62%, single task 8.77%)")


if __name__ == "__main__":
    main()
