#!/usr/bin/env bash
# Builds the wheel, installs it into a fresh virtual environment and runs
# the quickstart from it (one epoch, torch), outside the checkout, so that
# keras_mgda is imported from the wheel alone.
#
# The dependencies (keras, numpy, torch) come from this interpreter's
# site-packages through a .pth line, so the check downloads nothing but the
# build backend (setuptools, as pyproject's build-system asks; pass
# BUILD_ARGS=--no-isolation to build with the installed one). Any
# keras_mgda installed there (editable or not) is not seen: a path added by
# a .pth line is searched after the venv's own site-packages, and the .pth
# files inside it are not run.
#
# Usage: bash scripts/check_wheel.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "=== python -m build --wheel ==="
"$PYTHON" -m build --wheel --outdir "$work/dist" ${BUILD_ARGS:-} "$root" > "$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/keras_mgda-*.whl)
echo "built $(basename "$wheel")"
"$PYTHON" - "$wheel" <<'PY'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "keras_mgda/__init__.py" in names, "the package is missing from the wheel"
assert any(n.endswith("LICENSE") for n in names), "the licence is missing from the wheel"
stray = sorted({n.split("/")[0] for n in names} - {"keras_mgda"} - {n.split("/")[0] for n in names if ".dist-info" in n})
assert not stray, f"the wheel carries more than the package: {stray}"
PY

echo "=== fresh venv, pip install the wheel ==="
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
deps=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv_site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$venv_site/dependencies_from_the_test_environment.pth"
"$venv_python" -m pip install --quiet --no-deps --no-index "$wheel"

echo "=== the quickstart, from the wheel ==="
cd "$work"
"$venv_python" -c "
import keras_mgda
assert keras_mgda.__file__.startswith('$venv_site'), keras_mgda.__file__
print('keras_mgda', keras_mgda.__version__, 'from', keras_mgda.__file__)
"
KERAS_BACKEND=torch "$venv_python" "$root/examples/quickstart.py" --epochs 1
