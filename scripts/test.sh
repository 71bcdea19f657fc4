#!/usr/bin/env bash
# Installs keras_mgda with its test dependencies and runs the test suite once
# per Keras backend in BACKENDS (default: all three), then prints how long
# each part took.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS=${BACKENDS:-"tensorflow jax torch"}
# pytest-xdist processes per backend: one per core, at most 4 (each holds a
# backend and its compiled test models in memory).
WORKERS=${WORKERS:-$(python -c "import os; print(min(4, max(1, len(os.sched_getaffinity(0)))))")}
start=$SECONDS
timings=""
timed() {  # timed LABEL COMMAND...: runs it, records its wall time
  local label=$1 begin=$SECONDS
  shift
  "$@" || status=1
  timings="$timings$(printf '%-28s %5d s' "$label" $((SECONDS - begin)))\n"
}
status=0
# JAX's compilation cache, shared by this run's test processes and removed
# at the end (tests/conftest.py), so every run compiles from scratch once.
KERAS_MGDA_TEST_JAX_CACHE=$(mktemp -d)
export KERAS_MGDA_TEST_JAX_CACHE
trap 'rm -rf "$KERAS_MGDA_TEST_JAX_CACHE"' EXIT
# torch==2.13.0 is the CPU build; a plain `torch` requirement would pull a
# multi-GB CUDA build onto machines without a GPU.
timed "install" python -m pip install --quiet -e ".[tensorflow,jax,test]" "torch==2.13.0"
echo "=== ruff check ==="
timed "ruff check" python -m ruff check .
# The documentation site, strict: a broken link, a missing page or a
# docstring that does not render fails the build (site/ is ignored).
echo "=== mkdocs build --strict ==="
timed "mkdocs build --strict" env KERAS_BACKEND=torch python -m mkdocs build --strict --quiet
for backend in $BACKENDS; do
  echo "=== KERAS_BACKEND=$backend ==="
  # --dist loadfile: a module's tests share one process, so its compiled
  # fixtures are built once.
  timed "pytest $backend" env KERAS_BACKEND=$backend python -m pytest -q -p no:cacheprovider \
    -n "$WORKERS" --dist loadfile "$@"
done
printf '=== wall time ===\n%b%-28s %5d s\n' "$timings" "total" $((SECONDS - start))
exit $status
