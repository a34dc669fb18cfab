"""benchmarks/structured_output.py's ZeroC side and its comparison, without vLLM (the script itself runs by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import structured_output  # noqa: E402


def test_guided_runs_and_compares_against_a_second_run():
    prompts = structured_output.greedy_prompts(3, 12)
    a = structured_output.zeroc_guided(prompts, 80, threads=1, kv_gib=1)
    b = structured_output.zeroc_guided(prompts, 80, threads=1, kv_gib=1)
    assert [len(o["ids"]) for o in a["free"]] == [80] * 3
    row = structured_output.compare(a, b)
    assert row["same_guided_tokens"] == 3 and row["zeroc"]["guided_tok_s"] > 0
    assert row["zeroc"]["instances"] == sum(o["text"].endswith("}") for o in a["guided"]) > 0
    broken = dict(b, guided=[dict(o, ids=o["ids"][:-1], text=o["text"][:-1]) for o in b["guided"]])
    row = structured_output.compare(a, broken)
    assert row["same_guided_tokens"] == 0 and row["vllm"]["instances"] == 0
