"""Fixtures of the weighting tests: the engine (keras.ops, and on torch the
NumPy host path for the weightings the torch step solves on the host) and
the report of the worst measured values.

The weightings are mathematics on a Gram matrix and losses: their
properties, exactness and peer comparisons run once, under torch (every
test here is `one_backend`, see ../conftest.py). What is backend-specific,
each method compiled with jax.jit or tf.function (and XLA) as the model's
step runs it, is checked on every backend by test_backends.py and the
tests marked `all_backends`."""

from pathlib import Path

import pytest

from ._calling import ENGINES
from ._calling import MEASURED

HERE = Path(__file__).parent


def pytest_generate_tests(metafunc):
    """The `engine` argument of a test: "keras" everywhere; on torch also
    "numpy" (the torch step's host solve) when the module's `WEIGHTING`
    (its class, built with defaults) is solved there, by the torch step's
    own rule (`solvable_on_host`)."""
    if "engine" in metafunc.fixturenames:
        cls = getattr(metafunc.module, "WEIGHTING", None)
        on_host = cls is None or cls().solvable_on_host
        metafunc.parametrize("engine", ENGINES if on_host else ["keras"])


@pytest.fixture(scope="module", autouse=True)
def report():
    """Prints the worst values `measure` recorded in the module (pytest -s)."""
    MEASURED.clear()
    yield
    if MEASURED:
        print("\nworst measured: " + ", ".join(f"{k}={v:.2e}" for k, v in sorted(MEASURED.items())))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Marks every test of this folder `one_backend`."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.one_backend)
