"""The project's scripts (benchmarks/, scripts/) as modules, for their tests."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path, name=None):
    """The script at `relative_path` (from the repository root), executed
    as a module named `name` (default: its file name)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
