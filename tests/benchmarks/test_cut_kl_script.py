"""The cut-measurement benchmark runs end to end on a few cuts and finds both ways' KLs equal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cut_kl.py"


def test_a_short_run_times_both_ways_and_their_kls_agree(tmp_path):
    out = tmp_path / "cut_kl.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--sensitivity-tokens", "128", "--window", "64",
                        "--ablation-tokens", "0", "--limit", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["cuts"] == 4 and row["sensitivity_tokens"] == 128
    assert row["whole_s_per_cut"] > 0 and row["resumed_s_per_cut"] > 0
    assert row["max_abs_kl_diff"] < 1e-6
    assert len(r.stdout.splitlines()) == 1
