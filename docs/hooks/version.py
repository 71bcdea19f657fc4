"""MkDocs hook: the package's version on the site, read from
keras_mgda/__init__.py (no import: the build needs no backend). It shows
in every page's footer and replaces `{{ version }}` in a page's text."""

import re
from pathlib import Path

VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (Path(__file__).resolve().parents[2] / "keras_mgda" / "__init__.py").read_text(),
    re.M,
).group(1)


def on_config(config):
    config["copyright"] = f"keras_mgda {VERSION} · Apache License 2.0"
    return config


def on_page_markdown(markdown, page, config, files):
    return markdown.replace("{{ version }}", VERSION)
