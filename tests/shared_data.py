"""The real data the tests read from the workplace's shared folder.

`../shared/data/mnist.npz` (relative to the repository) is never copied
into the repository. Where it is missing the tests that need it are
skipped, except under CI (`CI=true`), where it must be present: a missing
file there fails them instead of silently testing less.
"""

import os
from pathlib import Path

import pytest

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def require_mnist():
    """The path of the real MNIST, or a skip (a failure under CI)."""
    if MNIST.exists():
        return MNIST
    message = f"real MNIST not at {MNIST}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must provide it (see ../shared/data/README.md)")
    pytest.skip(message)


needs_mnist = pytest.mark.usefixtures("mnist_path")
