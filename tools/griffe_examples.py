"""Griffe extension for the docs build: read a Google-style `Example:` section as `Examples:`.

tfpipe's docstrings head their doctests `Example:`. Griffe treats that singular heading as an
admonition whose text is Markdown, so `>>> s.ranks[1][0]` would render as prose (and `[1][0]`
as a broken reference link); `Examples:` makes griffe parse the `>>>` lines into code blocks.
Loaded by mkdocs.yml (`plugins: mkdocstrings: handlers: python: options: extensions`).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Renames `Example:` section headings to `Examples:` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
