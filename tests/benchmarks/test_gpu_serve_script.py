"""The prepared whole-stack script runs end to end on the CPU (real service processes, quick mode).

This keeps it from rotting between GPU sessions: every mode passes (same greedy tokens as a direct
engine, the KV bytes its ranks predict) and the output says what one GPU cannot show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_serve.py"


def test_quick_cpu_run_passes_every_mode_for_both_models():
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert "two GPUs" in report["nccl"] and "two GPUs" in r.stderr
    assert {(row["model"], row["mode"]) for row in report["rows"]} == {
        (m, mode) for m in ("bundled", "zeroc-heads-tier") for mode in ("grpc", "auto", "colocated")}
    for row in report["rows"]:
        assert row["ok"] and row["tokens_equal_direct"] and row["kv_bytes_ok"], row
        assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0
        shipped = sum(row["kv_bytes"])
        assert (shipped == 0) == (row["mode"] == "colocated")
    # the compressed model ships fewer bytes for the same prompts
    by = {(row["model"], row["mode"]): sum(row["kv_bytes"]) for row in report["rows"]}
    assert 0 < by[("zeroc-heads-tier", "grpc")] < by[("bundled", "grpc")]


def test_half_precision_runs_may_part_only_at_a_float32_near_tie():
    """Two bfloat16 runs that compute a step differently (disaggregated or colocated) may pick either of two
    tokens whose float32 logits lie within two bfloat16 spacings; a wider gap is a real difference, and a
    float32 run must match exactly."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_serve import bf16_ulp, near_tie

    class Fixed(torch.nn.Module):  # a model whose last position's logits are given
        def __init__(self, logits):
            super().__init__()
            self.lm_head = torch.nn.Linear(1, 1)
            self.logits = torch.tensor(logits)

        def forward(self, ids):
            return self.logits.expand(ids.shape[0], ids.shape[1], -1)

    assert bf16_ulp(6.0) == 2 ** -5 and bf16_ulp(-0.7) == 2 ** -8
    oracle = Fixed([6.0067, 5.9907, 5.8, 0.0])  # 0.016 apart (seen on a GPU), then 0.2 below
    assert near_tie(oracle, [5, 7], [], 0, 1) and near_tie(oracle, [5, 7], [9], 1, 0)
    assert not near_tie(oracle, [5, 7], [], 0, 2)

    from argparse import Namespace
    from types import SimpleNamespace

    from gpu_serve import first_difference, tie_prompts

    direct = [SimpleNamespace(token_ids=want, prompt_token_ids=[5, 7]) for want in ([0, 3], [0, 3], [1, 3])]
    got = [{"tokens": toks} for toks in ([0, 3], [1, 3], [1, 3])]  # the second parts at 0: a tie (0 vs 1)
    firsts = [first_difference(g["tokens"], d.token_ids) for g, d in zip(got, direct)]
    assert firsts == [None, 0, None]
    loads = []
    lazy = lambda: loads.append(1) or oracle  # noqa: E731
    assert tie_prompts(lazy, Namespace(dtype="bfloat16"), direct, got, firsts) == [1]
    assert tie_prompts(lazy, Namespace(dtype="float32"), direct, got, firsts) is None  # float32: no ties
    got[1] = {"tokens": [2, 3]}  # 6.0067 against 5.8: a real difference
    assert tie_prompts(lazy, Namespace(dtype="bfloat16"), direct, got, [None, 0, None]) is None
    same = [{"tokens": d.token_ids} for d in direct]
    assert tie_prompts(lazy, Namespace(dtype="float32"), direct, same, [None] * 3) == []  # equal: no ties needed
