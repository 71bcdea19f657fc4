"""Fixtures and collection rules shared by the test modules.

Two rules keep the suite fast without losing a check (tests/README.md):
- Tests marked `one_backend` check mathematics that does not depend on the
  Keras backend (NumPy references, exactness against an oracle, pure
  Python): they run under `MATH_BACKEND` (torch, the fastest) and are
  deselected on the others. A module marked as a whole keeps the checks
  that are backend-specific (jit, XLA, dtype) with `all_backends`.
- Tests compile with cheap compiler settings (XLA optimisation level 0 on
  JAX): what they compare is our algorithm, not XLA's optimised kernels.
  Benchmarks and examples keep the default settings.
"""

import os

# Before JAX creates its XLA client (at the first computation, after this
# import): the optimisation passes cost more than the tiny test models run.
_FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_XLA}".strip()

MATH_BACKEND = "torch"


def _share_jax_compilations():
    """JAX's persistent compilation cache, shared by the test processes of
    a run and by the processes they start (a resumed run, several devices,
    several workers): the suite compiles the same tiny models' steps again
    and again (one per parametrised case), and a cached executable loads in
    milliseconds. Keyed by the program, the flags and the JAX version, so a
    hit runs exactly what a compilation would have produced. Set through
    the environment (JAX reads it when it starts), so that child processes
    inherit it."""
    import tempfile

    directory = os.environ.get(
        "KERAS_MGDA_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"keras_mgda_test_jax_cache_{os.getuid()}")
    )
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", directory)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_jax_compilations()

import keras  # noqa: E402
import pytest  # noqa: E402
from shared_data import require_mnist  # noqa: E402


def _runs_here(item):
    return not item.get_closest_marker("one_backend") or item.get_closest_marker("all_backends")


def pytest_collection_modifyitems(config, items):
    """Deselects `one_backend` tests when the backend is not MATH_BACKEND."""
    if keras.backend.backend() == MATH_BACKEND:
        return
    dropped = [item for item in items if not _runs_here(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if _runs_here(item)]


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
