"""Fixtures shared by the test modules."""

import keras
import pytest
from shared_data import require_mnist


@pytest.fixture
def mnist_path():
    """The real MNIST's path (see `shared_data.require_mnist`)."""
    return require_mnist()


@pytest.fixture
def float64():
    """Builds and runs models in float64 for the duration of a test, so
    that what is compared is the algorithm and not float32 rounding (finite
    differences and dense solves to 1e-7 need it; JAX needs x64 on)."""
    previous, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    x64 = None
    if keras.backend.backend() == "jax":
        import jax

        x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
    # The global dtype policy is fixed once the first layer exists, and
    # layers read it, not floatx: set both.
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        keras.config.set_floatx(previous)
        if x64 is not None:
            jax.config.update("jax_enable_x64", x64)
