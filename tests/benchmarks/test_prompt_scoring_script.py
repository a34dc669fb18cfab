"""benchmarks/prompt_scoring.py's ZeroC side and its comparison, without vLLM (the script itself runs by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import prompt_scoring  # noqa: E402


def test_scoring_runs_and_compares_against_a_second_run():
    prompts = prompt_scoring.greedy_prompts(3, 12)
    a = prompt_scoring.zeroc_scoring(prompts, 2, threads=1, kv_gib=1)
    b = prompt_scoring.zeroc_scoring(prompts, 2, threads=1, kv_gib=1)
    assert [len(x) for x in a["logprobs"]] == [len(p) for p in prompts]
    row = prompt_scoring.compare(prompts, a, b)
    assert row["max_gap"] < 1e-5 and row["best_agree"] == 1.0 and row["zeroc"]["scoring_tok_s"] > 0
    shifted = dict(b, logprobs=[[None] + [v - 0.5 for v in x[1:]] for x in b["logprobs"]])
    assert abs(prompt_scoring.compare(prompts, a, shifted)["max_gap"] - 0.5) < 1e-5
