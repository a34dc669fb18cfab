"""benchmarks/shared_choices.py's round against the session's colocated service (the script itself runs by hand)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import shared_choices  # noqa: E402


def test_a_shared_round_computes_the_prompt_once(services):
    prompt = f"[{uuid.uuid4().hex}] " + "A list comprehension builds a list from an iterable. " * 6
    row = asyncio.run(shared_choices.one_round(services.colocated, prompt, 3, 2, share=True))
    full_blocks = (row["prompt_tokens"] - 1) // 16 * 16
    assert row["computed"] == 3 * row["prompt_tokens"] - 2 * full_blocks
    assert row["wall_s"] > 0 and row["ttft_first_ms"] <= row["ttft_last_ms"]
