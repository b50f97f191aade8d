"""MkDocs hook: the docstrings' Sphinx roles (``:class:`X```, ``:mod:`x.y```) as plain code.

The docstrings are written for ``help()`` and read in a terminal; mkdocstrings renders their
Google-style sections and Markdown, but not Sphinx roles, which would show as ``:class:``.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|obj|exc):(<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(r"\1", html)
