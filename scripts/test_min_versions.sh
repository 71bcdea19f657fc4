#!/usr/bin/env bash
# Runs the test suite in a fresh virtual environment where every dependency
# is at the floor pyproject.toml declares (keras, numpy, the backend's extra)
# and Python is the oldest supported one, on one Keras backend (BACKEND,
# default torch). Then checks that `import keras_mgda` refuses the Keras
# release just below the floor with its ImportError.
#
#   bash scripts/test_min_versions.sh              # torch, as CI runs it
#   BACKEND=jax bash scripts/test_min_versions.sh  # any backend
#   PYTHON=/path/to/python3.10 VENV=/tmp/v bash scripts/test_min_versions.sh
#
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${BACKEND:-torch}
VENV=${VENV:-${TMPDIR:-/tmp}/keras_mgda_min_versions}

# The floors, read from pyproject.toml: "keras>=3.10" becomes "keras==3.10".
read -r -a FLOORS <<<"$(python3 - "$BACKEND" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"] + project["optional-dependencies"][sys.argv[1]]
pins = []
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)>=([0-9.]+)", requirement.replace(" ", ""))
    if not match:
        sys.exit(f"pyproject.toml: {requirement!r} declares no floor (name>=version)")
    pins.append(f"{match[1]}=={match[2]}")
python_floor = project["requires-python"].removeprefix(">=")
print(python_floor, *pins)
EOF
)"
PYTHON_FLOOR=${FLOORS[0]}
PINS=("${FLOORS[@]:1}")

# The test extra's packages, less the lint and docs tools (the main run has
# them).
read -r -a TEST_TOOLS <<<"$(python3 - <<'EOF'
import re, tomllib
test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
left_out = ("ruff", "mkdocs", "mkdocs-material", "mkdocstrings")
print(*(r for r in test if re.match(r"[A-Za-z0-9_.\-]+", r)[0] not in left_out))
EOF
)"

# The oldest supported Python: $PYTHON, python3.X on the PATH, or pyenv's.
if [ -z "${PYTHON:-}" ]; then
  for candidate in "python$PYTHON_FLOOR" "$(pyenv root 2>/dev/null)"/versions/"$PYTHON_FLOOR".*/bin/python; do
    if "$candidate" --version >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "No Python $PYTHON_FLOOR found (set PYTHON=...); using python3" >&2
  PYTHON=python3
fi

echo "=== minimum versions: $("$PYTHON" --version), ${PINS[*]}, KERAS_BACKEND=$BACKEND ==="
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# The floors as constraints: pip fails instead of quietly installing newer
# versions when a test dependency wants more.
printf '%s\n' "${PINS[@]}" >"$VENV/floors.txt"
python -m pip install --quiet -c "$VENV/floors.txt" "${PINS[@]}" "${TEST_TOOLS[@]}" -e .
python -m pip list 2>/dev/null | grep -iE "^(keras|numpy|torch|jax|jaxlib|tensorflow|scipy) " || true

status=0
KERAS_BACKEND=$BACKEND python -m pytest -q -p no:cacheprovider "$@" || status=1

# One minor release below the floor, `import keras_mgda` must refuse.
keras_floor=$(printf '%s\n' "${PINS[@]}" | sed -n 's/^keras==//p')
below="${keras_floor%%.*}.$((${keras_floor#*.} - 1)).*"
python -m pip install --quiet "keras==$below"
if output=$(KERAS_BACKEND=$BACKEND python -c "import keras_mgda" 2>&1); then
  echo "FAILED: import keras_mgda with Keras $below did not raise" >&2
  status=1
elif ! grep -q "ImportError: keras_mgda needs Keras $keras_floor or newer" <<<"$output"; then
  echo "FAILED: import keras_mgda with Keras $below: unexpected error:" >&2
  echo "$output" >&2
  status=1
else
  echo "import keras_mgda with Keras $below: $(tail -2 <<<"$output" | head -1)"
fi
exit $status
