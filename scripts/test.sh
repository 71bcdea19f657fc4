#!/usr/bin/env bash
# Installs keras_mgda with its test dependencies and runs the test suite on
# each Keras backend named in BACKENDS (default: tensorflow).
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS=${BACKENDS:-tensorflow}
python -m pip install --quiet -e ".[tensorflow,test]"
status=0
for backend in $BACKENDS; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -q "$@" || status=1
done
exit $status
