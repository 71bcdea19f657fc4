"""Fixtures of the weighting tests: the engine (keras.ops, and on torch the
NumPy host path for the weightings the torch step solves on the host) and
the report of the worst measured values."""

import pytest

from ._calling import ENGINES
from ._calling import MEASURED


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
