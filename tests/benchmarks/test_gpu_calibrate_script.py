"""The prepared GPU calibration run works end to end on the CPU with --tiny, and projects from what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_calibrate.py"


def test_tiny_cpu_run_reports_phases_and_a_projection(tmp_path):
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--quiet", "--json", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["layers"] == 2 and res["shape"] == "tiny"
    assert res["kv_fraction"] <= 0.5
    assert all(res[k] > 0 for k in ("per_layer_s", "kl_passes_s", "compress_s"))
    # 16x the layers: per-layer phases x16, KL passes x256 (x16 when capped)
    assert res["projected_32_layers_s"] > res["projected_32_layers_capped_passes_s"] >= 32 * res["per_layer_s"]
    assert "projected calibration of 32 layers" in r.stderr
