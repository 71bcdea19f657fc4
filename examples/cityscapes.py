"""Cityscapes with MGDA-UB: semantic segmentation, instance offsets and
disparity from one ResNet-50 trunk and three pyramid-pooling decoders.

The authors' setup: 256x512 images, Adam with learning rate 5e-4, batch 8,
100 epochs, MGDA-UB, ImageNet-initialised ResNet-50 (--weights imagenet,
downloaded by Keras; the default here). Validation after every epoch;
results.json holds the validation split's mean IoU, instance error (pixels)
and disparity error (pixels) at the end (paper, MGDA-UB: 66.63 mIoU, 10.25
px, 2.54); history.csv holds Keras's History. Cityscapes' test labels are
withheld, so the final numbers are on the validation split, as the paper's.

Data (manual download, registration at cityscapes-dataset.com):
  --source tfds (default): the zip files in --data (tensorflow-datasets'
      manual folder: leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip,
      disparity_trainvaltest.zip, rightImg8bit_trainvaltest.zip); --data-dir
      is tensorflow-datasets' data directory.
  --source files: --data is the folder holding the extracted leftImg8bit/,
      gtFine/ and disparity/ (no right images needed).

Usage:
    python examples/cityscapes.py --data ~/cityscapes_zips
    python examples/cityscapes.py --source files --data ~/cityscapes --method uniform
    python examples/cityscapes.py --source files --data ~/cityscapes --image-size 128 256 --epochs 1
"""

import _common  # noqa: F401  (sets the default backend before Keras loads)
import keras  # noqa: E402

import keras_mgda as km  # noqa: E402


def main():
    p = _common.parser(__doc__, epochs=100, batch_size=8, lr=5e-4, output="runs/cityscapes")
    p.add_argument("--data", default=None, help="manual download folder (tfds) or extracted folder (files)")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory (--source tfds)")
    p.add_argument("--source", choices=("tfds", "files"), default="tfds")
    p.add_argument("--image-size", type=int, nargs=2, default=(256, 512), metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--weights", choices=("imagenet", "none"), default="imagenet")
    args = p.parse_args()
    if args.output == "runs/cityscapes":
        args.output = f"runs/cityscapes-{args.method}"

    size = tuple(args.image_size)

    def load(split):
        if args.source == "files":
            return km.datasets.cityscapes(split, data_dir=args.data, image_size=size, source="files")
        return km.datasets.cityscapes(
            split, data_dir=args.data_dir, manual_dir=args.data, image_size=size, source="tfds"
        )

    try:
        train, validation = load("train"), load("validation")
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from error
    train = _common.limit(train, args.train_examples)
    validation = _common.limit(validation, args.test_examples)
    train = train.shuffle(500, seed=args.seed, reshuffle_each_iteration=True).batch(args.batch_size).prefetch(2)
    validation = validation.batch(args.batch_size).prefetch(2)
    weights = None if args.weights == "none" else args.weights

    def build(weighting):
        return km.models.cityscapes_pspnet(weighting=weighting, input_shape=size + (3,), weights=weights)

    def compile_kwargs():
        return {
            "optimizer": keras.optimizers.Adam(args.lr),
            "loss": km.models.cityscapes_losses(),
            "metrics": km.models.cityscapes_metrics(),
        }

    results = _common.run(
        args, "cityscapes", build, compile_kwargs, train, validation,
        primary={
            "segmentation": ("mean_iou", False),
            "instance": ("instance_error", True),
            "disparity": ("disparity_error", True),
        },
        info={"data": f"cityscapes via {args.source}", "image_size": list(size), "trunk_weights": args.weights},
    )
    s = results["scores"]
    print(
        "validation: "
        + ", ".join(
            text for text in (
                f"mIoU {100 * s['segmentation']:.2f}" if "segmentation" in s else "",
                f"instance error {s['instance']:.2f} px" if "instance" in s else "",
                f"disparity error {s['disparity']:.2f} px" if "disparity" in s else "",
            ) if text
        )
        + "  (paper, MGDA-UB: 66.63 mIoU, 10.25 px, 2.54)"
    )


if __name__ == "__main__":
    main()
