#!/usr/bin/env bash
# Installs keras_mgda with its test dependencies and runs the test suite once
# per Keras backend in BACKENDS (default: all three).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS=${BACKENDS:-"tensorflow jax torch"}
# torch==2.13.0 is the CPU build; a plain `torch` requirement would pull a
# multi-GB CUDA build onto machines without a GPU.
python -m pip install --quiet -e ".[tensorflow,jax,test]" "torch==2.13.0"
echo "=== ruff check ==="
status=0
python -m ruff check . || status=1
# The documentation site, strict: a broken link, a missing page or a
# docstring that does not render fails the build (site/ is ignored).
echo "=== mkdocs build --strict ==="
KERAS_BACKEND=torch python -m mkdocs build --strict --quiet || status=1
for backend in $BACKENDS; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
