"""The prepared GPU benchmark script runs end to end (tiny shapes, Triton interpreter on the CPU).

This keeps the script from rotting between GPU sessions; its timings on the CPU mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def test_quick_run_reports_small_errors_and_every_timing(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert all(err < 1e-4 for err in report["max_abs_error"].values()), report["max_abs_error"]
    whats = {row["what"].split(" ")[0] + " " + row["what"].split(" ")[1] for row in report["timings"]}
    assert whats == {"decode attention", "prefill attention", "attention block"}
    assert all(row["ms"] > 0 for row in report["timings"])
