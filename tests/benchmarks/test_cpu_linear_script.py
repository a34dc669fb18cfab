"""The cpu-linear benchmark runs end to end on small batches and reports every GEMM and every engine side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_linear.py"


def test_a_short_run_reports_every_gemm_and_every_engine_side(tmp_path, cpu_kernel):
    # cpu_kernel: built once for the session (the script's own process then imports it), or a skip without a compiler
    out = tmp_path / "cpu_linear.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--batches", "2", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    sides = ("backend_ms", "unpacked_ms", "f_linear_ms")
    assert len(result["gemms"]) == 8 and all(g[k] > 0 for g in result["gemms"] for k in sides)
    assert all(e[k] > 0 for e in result["engine"] for k in sides)
    assert [e["what"] for e in result["engine"]] == ["decode b2", "prefill 1024"]
    assert len(r.stdout.splitlines()) == 10
