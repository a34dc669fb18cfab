"""`zeroc eval ppl --kv-policy`: JSON with the bytes held, and one-line errors for misuse."""

from __future__ import annotations

import json

from cli_runs import zeroc_here as zeroc
from zeroc.config import BUNDLED_HELDOUT

COMMON = ["eval", "ppl", "--data", str(BUNDLED_HELDOUT), "--ctx", "64", "--max-tokens", "130", "--json"]


def test_policy_at_full_budget_matches_plain_streaming_and_a_smaller_budget_holds_less(capsys, random_gqa_dir):
    small = ["--model", random_gqa_dir]  # the small random GQA model keeps this quick
    plain = zeroc(capsys, *COMMON, *small, "--streaming")
    full = zeroc(capsys, *COMMON, *small, "--streaming", "--kv-policy", "h2o", "--kv-budget", "1.0")
    half = zeroc(capsys, *COMMON, *small, "--streaming", "--kv-policy", "h2o", "--kv-budget", "0.5")
    for p in (plain, full, half):
        assert p.returncode == 0, p.stderr
    a, b, c = (json.loads(p.stdout) for p in (plain, full, half))
    assert abs(a["perplexity"] - b["perplexity"]) / a["perplexity"] < 1e-3
    assert b["policy"] == c["policy"] == "h2o" and c["budget"] == 0.5
    assert c["kv_fraction_mean"] < 0.6 < b["kv_fraction_mean"]


def test_misuse_is_a_one_line_error(capsys):
    cases = [(["--kv-policy", "h2o"], "needs --streaming"),
             (["--streaming", "--kv-budget", "0.5"], "needs a --kv-policy"),
             (["--streaming", "--kv-policy", "h2o", "--kv-budget", "1.5"], "budget must be in (0, 1]"),
             (["--streaming", "--kv-policy", "kivi-4", "--kv-budget", "0.25"], "0.3125"),
             (["--streaming", "--kv-policy", "int8", "--kv-budget", "0.5"], "int8 holds 0.5312")]
    for extra, message in cases:
        p = zeroc(capsys, *COMMON, *extra)
        assert p.returncode == 2 and p.stdout == ""
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("zeroc: error:") and message in lines[0], p.stderr
