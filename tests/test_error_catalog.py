"""Every catalogued bad input raises its clear error, leaves the model as it was, and is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.error_cases import BUILT, CASES, message_of
from tfpipe.placement import device_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def test_at_least_thirty_kinds():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_message(case):
    BUILT.clear()
    message = message_of(case)
    assert re.search(case.pattern, message), message
    # nothing the user gave is lost: weights unchanged, variables not left half-moved
    for model, weights in BUILT:
        for v, before in zip(model.weights, weights):
            assert (v.numpy() == before).all(), f"{case.name}: {v.path} changed"
        if not case.after_placement:  # refused before anything moved
            assert {device_of(v) for v in model.weights} <= {"/device:CPU:0"}, case.name


def test_docs_list_every_case():
    text = DOCS.read_text()
    for n, case in enumerate(CASES, 1):
        assert f"## {n}. {case.name}" in text, f"docs/errors.md lacks {case.name!r}: regenerate it"
