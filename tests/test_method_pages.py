"""The generated tables of the method pages (docs/methods/*.md,
docs/methods.md, docs/guide/weightings.md) are what
`scripts/method_pages.py` writes from the code, the committed MultiMNIST
campaign and the step-time runs: a changed default, a new result or a new
method shows up as a stale page here."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_backend

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("method_pages", ROOT / "scripts" / "method_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_weighting_has_a_page_in_the_navigation():
    import keras_mgda as km

    pages = _script()
    assert sorted(method.key for method in pages.METHODS) == sorted(km.weighting.by_name())
    navigation = (ROOT / "mkdocs.yml").read_text()
    for method in pages.METHODS:
        assert (ROOT / "docs" / "methods" / f"{method.key}.md").exists(), method.key
        assert f"methods/{method.key}.md" in navigation, method.key


def test_generated_blocks_are_up_to_date():
    pages = _script()
    summaries = pages._summary()
    stale = [str(page.relative_to(ROOT)) for page in pages.pages() if pages.render(page, summaries) != page.read_text()]
    assert not stale, f"run `python scripts/method_pages.py`: stale {stale}"


def test_curve_offset_interpolates_the_static_curve():
    pages = _script()
    grid = [{"mean": [0.94, 0.96]}, {"mean": [0.96, 0.94]}]
    assert pages.curve_offset({"mean": [0.95, 0.955]}, grid) == pytest.approx(0.5)
    assert pages.curve_offset({"mean": [0.97, 0.95]}, grid) is None  # beyond the curve's range
