"""The prepared engine-runtime check runs on the CPU and passes (graphs there: the padded eager path; async
scheduling as on a device)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_engine.py"


def test_cpu_run_passes_every_check():
    # make test runs under TRITON_INTERPRET=1, which the flex check's backend needs on the CPU
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:11]] == [["graphs", "pass"], ["syncs", "pass"], ["seeded", "pass"],
                                                          ["extras", "pass"], ["isolation", "pass"],
                                                          ["speculative", "pass"], ["async", "pass"],
                                                          ["backends", "pass"], ["tier", "pass"], ["int8", "pass"],
                                                          ["flex", "pass"]]


def test_checks_runs_the_named_checks_only():
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--checks", "int8", "syncs"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [["int8", "pass"], ["syncs", "pass"],
                                                                     ["all", "pass:"]]
    # two consecutive decode steps counted apart, one sync (host read) each
    assert "[1, 1] in consecutive decode steps" in r.stdout.splitlines()[1], r.stdout
