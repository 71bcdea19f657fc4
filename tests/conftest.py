"""Fixtures shared by the test modules."""

import pytest
from shared_data import require_mnist


@pytest.fixture
def mnist_path():
    """The real MNIST's path (see `shared_data.require_mnist`)."""
    return require_mnist()
