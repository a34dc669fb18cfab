"""Fixtures of the serving-policy tests."""

from __future__ import annotations

import pytest

from zeroc.config import BUNDLED_HELDOUT
from zeroc.data import read_eval_tokens


@pytest.fixture(scope="session")
def heldout_ids(bundled) -> list[int]:
    """Real text: 160 held-out tokens."""
    return read_eval_tokens(bundled.tokenizer, BUNDLED_HELDOUT, max_tokens=160).tolist()
