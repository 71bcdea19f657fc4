"""MkDocs hook: the TeX that `pymdownx.arithmatex` marks (`$...$` inline,
`$$...$$` as a block) becomes MathML at build time, which browsers
typeset natively: the site shows formulas offline, with no script and no
CDN.

A formula that `latex2mathml` cannot translate fully (an unknown command
left as text) stops the build, naming the page and the formula.
"""

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

INLINE = re.compile(r'<span class="arithmatex">\\\((?P<tex>.*?)\\\)</span>', re.S)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(?P<tex>.*?)\\\]</div>', re.S)
# An untranslated command survives as text inside a MathML token.
LEFT_OVER = re.compile(r"<m[ion][^>]*>[^<]*\\")


def _typeset(tex, display, page):
    tex = html.unescape(tex).strip()
    try:
        mathml = convert(tex, display="block" if display else "inline")
    except Exception as error:  # latex2mathml raises several types
        raise PluginError(f"{page}: cannot typeset ${tex}$: {error}") from error
    if LEFT_OVER.search(mathml):
        raise PluginError(f"{page}: a command in ${tex}$ has no MathML translation; rewrite it.")
    # Screen readers and copy-paste get the TeX too.
    return mathml.replace("<math ", f'<math alttext="{html.escape(tex)}" ', 1)


def on_page_content(content, page, config, files):
    """Replace arithmatex's TeX spans and blocks by MathML."""
    where = page.file.src_uri
    content = BLOCK.sub(lambda m: _typeset(m.group("tex"), True, where), content)
    return INLINE.sub(lambda m: _typeset(m.group("tex"), False, where), content)
