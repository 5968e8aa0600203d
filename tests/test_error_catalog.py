"""Every catalogued bad input raises its clear error, leaves the model as it was, and is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.error_cases import CASES, message_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def test_at_least_thirty_kinds():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_message(case):
    message = message_of(case)
    assert re.search(case.pattern, message), message


def test_docs_list_every_case():
    text = DOCS.read_text()
    for n, case in enumerate(CASES, 1):
        assert f"## {n}. {case.name}" in text, f"docs/errors.md lacks {case.name!r}: regenerate it"
