"""Token helpers shared by tests that need a marker token the model itself produces."""

from __future__ import annotations


def one_token_text(tokenizer, ids: list[int]) -> tuple[int, str]:
    """The first of `ids` from the third on whose text the tokenizer reads back as that one token, and its text: a
    stand-in for a reasoning model's "</think>" that a model without one generates on its own."""
    for t in ids[2:]:
        text = tokenizer.decode([t])
        if text.strip() and tokenizer.encode(text, add_special_tokens=False) == [t]:
            return t, text
    raise AssertionError(f"no token of {ids} reads back as itself")
