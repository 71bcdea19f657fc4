#!/usr/bin/env bash
# Runs the examples whose output the examples page (docs/examples.md)
# shows (quickstart, MultiMNIST, multi-worker) and writes what they print,
# and the task-weight figure of the MultiMNIST run, into docs/examples/. On torch; MNIST=path/to/mnist.npz gives the real
# MultiMNIST (without it the example trains on scikit-learn's digits and
# says so).
#
# Usage: MNIST=~/mnist.npz bash scripts/example_outputs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND=torch
out=docs/examples
mkdir -p "$out"
python examples/quickstart.py > "$out/quickstart.txt"
python examples/multi_mnist.py --epochs 2 --verbose 2 --output runs/multi_mnist-2-epochs \
  ${MNIST:+--data "$MNIST"} > "$out/multi_mnist.txt"
python examples/multi_worker.py --engine torch --workers 2 ${MNIST:+--data "$MNIST"} \
  --epochs 1 --steps 10 --test-examples 1000 --output runs/multi_worker > "$out/multi_worker.txt"
python - <<'PY'
from PIL import Image

# A 256-colour palette keeps the committed PNG small.
image = Image.open("runs/multi_mnist-2-epochs/task_weights.png").convert("RGB")
image.quantize(colors=256).save("docs/examples/multi_mnist_task_weights.png", optimize=True)
PY
