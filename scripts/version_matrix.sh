#!/usr/bin/env bash
# Builds one virtual environment per row of the version matrix below (or of
# the rows given as arguments), runs the tests on each row's backends, and
# prints the support table of docs/installation.md with the results.
#
#   bash scripts/version_matrix.sh                  # every row (slow: hours on 2 cores)
#   bash scripts/version_matrix.sh "3.11 3.12.* 2.4.6 0.10.2 2.13.0 - torch"
#   TESTS="tests" bash scripts/version_matrix.sh    # the whole suite
#
# A row: python keras numpy jax torch tensorflow backends... ("-" leaves a
# package out; a version may be a pattern such as 3.12.*). Environments are
# kept under MATRIX_DIR and reused by rows with the same versions.
set -uo pipefail
cd "$(dirname "$0")/.."
MATRIX_DIR=${MATRIX_DIR:-${TMPDIR:-/tmp}/keras_mgda_matrix}
TESTS=${TESTS:-"tests/test_model.py tests/test_train_step.py tests/test_bad_input.py tests/test_keras_internals.py"}
TEST_TOOLS=(pytest hypothesis scipy)

ROWS=(
  # The floors pyproject.toml declares (scripts/test_min_versions.sh).
  "3.10 3.10.0 1.26.0 0.6.1 2.3.0 - torch jax"
  "3.10 3.10.0 1.26.0 - - 2.16.2 tensorflow"
  # Every Keras minor release on Python 3.11 with the newest backends.
  "3.11 3.10.* 2.4.6 0.10.2 2.13.0 2.21.0 torch jax tensorflow"
  "3.11 3.11.* 2.4.6 0.10.2 2.13.0 2.21.0 torch jax"
  "3.11 3.12.* 2.4.6 0.10.2 2.13.0 2.21.0 torch jax"
  "3.11 3.13.* 2.4.6 0.10.2 2.13.0 2.21.0 torch jax"
  "3.11 3.14.* 2.4.6 0.10.2 2.13.0 2.21.0 torch jax"
  "3.11 3.15.* 2.4.6 0.10.2 2.13.0 2.21.0 torch jax tensorflow"
  # The newest Python that all three backends ship wheels for.
  "3.13 3.15.* 2.4.6 0.10.2 - 2.21.0 jax tensorflow"
)
[ $# -gt 0 ] && ROWS=("$@")

python_for() {  # an interpreter of version $1: python3.X on the PATH, or pyenv's
  local candidate
  for candidate in "python$1" "$(pyenv root 2>/dev/null)"/versions/"$1".*/bin/python; do
    if "$candidate" --version >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  return 1
}

run_row() {
  local python=$1 keras=$2 numpy=$3 jax=$4 torch=$5 tensorflow=$6
  shift 6
  local venv="$MATRIX_DIR/py$python-np$numpy-jax$jax-torch$torch-tf$tensorflow"
  local interpreter pins=("numpy==$numpy")
  [ "$jax" != - ] && pins+=("jax[cpu]==$jax")
  [ "$torch" != - ] && pins+=("torch==$torch")
  [ "$tensorflow" != - ] && pins+=("tensorflow==$tensorflow")
  interpreter=$(python_for "$python") || { echo "| $python | no Python $python here |"; return; }
  if [ ! -x "$venv/bin/python" ]; then
    "$interpreter" -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --upgrade pip
  fi
  # The pins first, then Keras on top without touching them.
  "$venv/bin/python" -m pip install --quiet "${pins[@]}" "keras==$keras" "${TEST_TOOLS[@]}" >"$venv/install.log" 2>&1 ||
    { echo "| $python | $keras | install failed, see $venv/install.log |"; return; }
  local versions results="" backend summary
  versions=$("$venv/bin/python" - <<'EOF'
import importlib.metadata as m
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "-"
print(" | ".join(v(n) for n in ("keras", "tensorflow", "jax", "torch", "numpy")))
EOF
)
  for backend in "$@"; do
    summary=$(KERAS_BACKEND=$backend PYTHONPATH=$PWD "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      -W ignore $TESTS 2>&1 | tail -1 | sed -E 's/=+//g; s/ in [0-9.]+s.*//; s/^ +| +$//g')
    results+="$backend: $summary; "
  done
  echo "| $("$venv/bin/python" --version | cut -d' ' -f2) | $versions | ${results%; } |"
}

echo "Run on $(date +%Y-%m-%d) with: bash scripts/version_matrix.sh"
echo
echo "| Python | Keras | TensorFlow | JAX | PyTorch | NumPy | Tests ($TESTS) |"
echo "|---|---|---|---|---|---|---|"
for row in "${ROWS[@]}"; do
  # shellcheck disable=SC2086
  run_row $row
done
