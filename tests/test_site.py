"""The documentation site, built once per test session with `mkdocs build
--strict`: every public name is documented with its signature, and the
formulas are typeset (MathML) rather than left as TeX.
"""

import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_backend
# The documentation tools are the main test run's (scripts/test.sh); the
# minimum-versions run leaves them out.
pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parents[1]

# The public modules: every name in their `__all__` has a section in the
# API reference.
PUBLIC_MODULES = [
    "keras_mgda",
    "keras_mgda.callbacks",
    "keras_mgda.datasets",
    "keras_mgda.metrics",
    "keras_mgda.models",
    "keras_mgda.pareto",
    "keras_mgda.plots",
    "keras_mgda.solvers",
    "keras_mgda.weighting",
]
# Modules whose public callables have a type on every parameter, so that the
# reference shows what each argument takes.
TYPED_MODULES = [
    "keras_mgda",
    "keras_mgda.callbacks",
    "keras_mgda.datasets",
    "keras_mgda.metrics",
    "keras_mgda.models",
    "keras_mgda.plots",
    "keras_mgda.solvers",
    "keras_mgda.weighting",
]

HEADING = re.compile(
    r'<h(?P<level>[1-6]) id="(?P<id>keras_mgda[^"]*)" class="doc doc-heading">.*?</h(?P=level)>\s*'
    r'(?:<div class="doc-signature highlight">(?P<signature>.*?)</div>)?',
    re.S,
)


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The built site's directory (built once, strict: a warning fails)."""
    directory = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(directory)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


@pytest.fixture(scope="session")
def documented(site):
    """`{heading id: signature text or None}` over every page of the site."""
    found = {}
    for page in site.rglob("*.html"):
        for match in HEADING.finditer(page.read_text()):
            signature = match.group("signature")
            if signature is not None:
                signature = " ".join(html.unescape(re.sub(r"<[^>]+>", "", signature)).split())
            found.setdefault(match.group("id"), signature)
    return found


def _public_names():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name


def _section(documented, module_name, name, value):
    """The id of the section that documents `module_name.name`: under that
    path, under the path where it is defined, or under a submodule of the
    module (a function that shares its submodule's name is documented as
    `module.name.name`)."""
    paths = [f"{module_name}.{name}"]
    defined_in = getattr(value, "__module__", None)
    if defined_in and hasattr(value, "__qualname__"):
        paths.append(f"{defined_in}.{value.__qualname__}")
    for path in paths:
        if path in documented:
            return path
    for path in documented:
        if path.startswith(module_name + ".") and path.rsplit(".", 1)[-1] == name:
            return path
    return None


def _parameters(value):
    try:
        return inspect.signature(value).parameters.values()
    except (TypeError, ValueError):
        return None


PUBLIC_NAMES = list(_public_names())


@pytest.mark.parametrize("module_name, name", PUBLIC_NAMES, ids=[f"{m}.{n}" for m, n in PUBLIC_NAMES])
def test_every_public_name_is_documented_with_its_signature(documented, module_name, name):
    value = getattr(importlib.import_module(module_name), name)
    section = _section(documented, module_name, name, value)
    assert section is not None, f"{module_name}.{name} has no section in the API reference (docs/api/)"
    if inspect.ismodule(value) or not callable(value):
        return
    signature = documented[section]
    assert signature is not None and signature.startswith(f"{name}("), (section, signature)
    for parameter in _parameters(value) or ():
        shown = {parameter.VAR_KEYWORD: "**", parameter.VAR_POSITIONAL: "*"}.get(parameter.kind, "") + parameter.name
        assert re.search(rf"(?<![\w*]){re.escape(shown)}\b", signature), (section, shown, signature)


def _typed_callables():
    for module_name in TYPED_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value) and not inspect.ismodule(value) and _parameters(value) is not None:
                yield f"{module_name}.{name}", value


TYPED_CALLABLES = list(_typed_callables())


@pytest.mark.parametrize("path, value", TYPED_CALLABLES, ids=[path for path, _ in TYPED_CALLABLES])
def test_public_parameters_carry_a_type(path, value):
    untyped = [
        p.name for p in _parameters(value)
        if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    assert not untyped, f"{path}: parameters without a type annotation: {untyped}"


# Formulas -------------------------------------------------------------------

# What is not prose: code, scripts, styles and the typeset formulas.
NOT_PROSE = re.compile(r"<(pre|code|script|style|math)\b.*?</\1>", re.S)
RAW_TEX = re.compile(r"\$[^$\n]{1,200}\$|\\\(|\\\[")


def _prose(page):
    return re.sub(r"<[^>]+>", "", NOT_PROSE.sub("", page.read_text()))


def test_formulas_are_typeset_as_mathml(site):
    """The method pages show their update as MathML, inline and displayed,
    served by the site itself: no script or stylesheet from elsewhere."""
    for name in ("mgda", "nashmtl", "upgrad", "famo"):
        page = (site / "methods" / name / "index.html").read_text()
        assert '<math alttext="' in page and 'display="block"' in page, name
        assert "<mi>\\" not in page and "<mo>\\" not in page, name  # an untranslated command
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert 'class="arithmatex"' not in text, page
        for source in re.findall(r'<script[^>]+src="([^"]+)"', text):
            assert not source.startswith(("http:", "https:", "//")), (page, source)


def test_no_raw_tex_is_left_in_the_prose(site):
    left = {}
    for page in site.rglob("*.html"):
        found = RAW_TEX.findall(_prose(page))
        if found:
            left[str(page.relative_to(site))] = found[:3]
    assert not left, left


# The first pages a user reads ----------------------------------------------


def test_home_page_has_the_version_the_install_line_and_the_way_on(site):
    import keras_mgda

    home = (site / "index.html").read_text()
    assert f"Version {keras_mgda.__version__}" in home
    assert f"keras_mgda {keras_mgda.__version__}" in (site / "methods" / "mgda" / "index.html").read_text()  # footer
    text = html.unescape(re.sub(r"<[^>]+>", "", home))  # the highlighter splits code into spans
    assert "pip install" in text and 'href="getting_started/"' in home


def test_examples_page_shows_the_committed_outputs(site):
    page = html.unescape((site / "examples" / "index.html").read_text())
    for name in ("quickstart.txt", "multi_mnist.txt", "multi_worker.txt"):
        first_line = (ROOT / "docs" / "examples" / name).read_text().splitlines()[0]
        assert first_line and first_line in page, name
