"""The prepared GPU benchmark script runs end to end (tiny shapes, Triton interpreter on the CPU).

This keeps the script from rotting between GPU sessions; its timings on the CPU mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def test_quick_run_reports_small_errors_and_every_timing(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["skipped"] == []
    errors = report["max_abs_error"]
    assert all(err < 1e-4 for err in errors.values()), errors
    from zeroc_kernels.paged_decode import DECODE_CONFIGS
    from zeroc_kernels.paged_prefill import PREFILL_CONFIGS

    assert sum(name.startswith("decode_BLOCK_N") for name in errors) == len(DECODE_CONFIGS)
    assert sum(name.startswith("prefill_BLOCK_M") for name in errors) == len(PREFILL_CONFIGS)
    rows = report["timings"]
    assert {row["section"] for row in rows} == {"decode", "decode splits", "decode configs", "prefill",
                                                "prefill configs", "attention block", "layer ops", "tier decode",
                                                "tier prefill", "sampling", "flex"}
    assert {"rms_norm", "add_rms_norm", "silu_mul", "tier_decode", "tier_prefill"} <= errors.keys()
    assert [row["vs_sdpa"] > 0 for row in rows if row["section"] == "tier prefill"] == [True]
    flex = [row for row in rows if row["section"] == "flex"]
    assert [row["what"].split()[0] for row in flex] == ["decode", "decode", "decode", "prefill"]
    assert "per-head" in flex[2]["method"]
    assert all(row["vs_kernel"] > 0 and row["plan_ms"] > 0 and row["max_err_vs_kernel"] < 1e-4 for row in flex)
    sampled = [row for row in rows if row["section"] == "sampling"]
    assert [row["method"] for row in sampled][:2] == ["greedy", "temperature 0.8"] and len(sampled) == 10
    assert [row["method"] for row in sampled][6:] == ["greedy + 5 logprobs", "greedy + penalties",
                                                      "greedy, guided (kernel)", "greedy, guided (torch ops)"]
    assert sampled[0]["ratio"] == 1.0 and all(row["ratio"] > 0 for row in sampled)
    tier = [row for row in rows if row["section"] == "tier decode"]
    assert [row["method"] for row in tier] == ["kernel", "PyTorch ops (reference)"] and tier[0]["ratio"] > 0
    fused = [row for row in rows if row["section"] == "layer ops" and row["method"].endswith("fused")]
    assert len(fused) == 3 and all(row["ratio"] > 0 for row in fused)
    assert sum(row["method"].endswith("P @ V transposed (experiment)") for row in rows) == 3  # int8's twice, bf16's
    kernels = [row for row in rows if not row["method"].startswith("sdpa ")]
    assert all(row["ms"] > 0 for row in kernels)
    anchored = [row for row in rows if row["section"] in ("decode", "prefill")]
    assert all(row["sdpa_ms"] > 0 and math.isfinite(row["vs_sdpa"]) for row in anchored)
    assert any("after" in row["what"] for row in anchored)  # the cached-prefix case
    fresh = [row for row in anchored if row["method"].endswith("fresh path")]
    assert fresh and all(set(row["sdpa_backends"]) == {"fresh_views", "contiguous"} for row in fresh)
    assert "| decode |" in r.stdout and "copy " in r.stdout


def test_sections_runs_only_the_sections_named(tmp_path):
    """A short GPU lease reruns a few sections: the others are neither run nor reported as skipped."""
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--sections", "layer ops", "tier decode", "--json",
                        str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["skipped"] == [] and "ceilings" in report
    assert {row["section"] for row in report["timings"]} == {"layer ops", "tier decode"}
    assert all(row["ms"] > 0 for row in report["timings"])
