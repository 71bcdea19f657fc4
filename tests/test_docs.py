"""Every Python code block of the README and of docs/ runs, on the active
backend.

The blocks of one page run in order in one namespace, as a reader would
run them. A block that cannot run here (it needs a GPU, a download or
hours) is preceded by `<!-- not run: reason -->`, which this test requires
to give a reason. Shell blocks are not run (CI runs the commands they show).
"""

import importlib.util
import re
from pathlib import Path

import pytest

# The documentation's snippets and marks: once, under torch (tests/conftest.py).
pytestmark = pytest.mark.one_backend

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"(?:<!--\s*not run:(?P<reason>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page):
    """The page's Python blocks as `(code, skip_reason or None)`."""
    found = []
    for match in FENCE.finditer(page.read_text()):
        reason = match.group("reason")
        if reason is not None and not reason.strip():
            raise AssertionError(f"{page.name}: a `not run` mark without a reason")
        found.append((match.group("code"), None if reason is None else reason.strip()))
    return found


def _pages_with_code():
    return [page for page in PAGES if any(reason is None for _, reason in blocks(page))]


def test_every_not_run_mark_gives_a_reason():
    for page in PAGES:
        blocks(page)  # raises for an empty reason


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a snippet writes stay in tmp
    namespace = {"__name__": f"snippets_{page.stem}"}
    for index, (code, reason) in enumerate(blocks(page)):
        if reason is not None:
            continue
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}[{index}]", "exec"), namespace)
        except ModuleNotFoundError as error:
            # The minimum-versions run installs one backend only (torch);
            # keras.callbacks.TensorBoard writes through TensorFlow.
            if error.name == "tensorflow" and importlib.util.find_spec("tensorflow") is None:
                pytest.skip(f"{page.relative_to(ROOT)}, Python block {index} needs TensorFlow, not installed")
            raise AssertionError(f"{page.relative_to(ROOT)}, Python block {index}:\n{code}") from error
        except Exception as error:
            raise AssertionError(f"{page.relative_to(ROOT)}, Python block {index}:\n{code}") from error
