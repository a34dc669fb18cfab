"""The cpu-linear benchmark runs end to end on small batches and reports every GEMM and every engine side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeroc_kernels.cpu_linear import PACKED_DTYPES

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_linear.py"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_short_run_reports_every_gemm_and_every_engine_side(tmp_path, cpu_kernel, dtype):
    # cpu_kernel: built once for the session (the script's own process then imports it), or a skip without a compiler
    out = tmp_path / "cpu_linear.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--batches", "2", "--threads", "1",
                        "--dtype", dtype, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    sides = ("backend_ms", "unpacked_ms", "f_linear_ms")
    assert len(result["gemms"]) == 10 and all(g[k] > 0 for g in result["gemms"] for k in sides)
    assert all(e[k] > 0 for e in result["engine"] for k in sides)
    assert [e["what"] for e in result["engine"]] == ["decode b2", "prefill 1024"]
    assert result["dtype"] == dtype and result["packed"] == (getattr(torch, dtype) in PACKED_DTYPES)
    assert len(r.stdout.splitlines()) == 12


def test_the_engine_rows_run_on_layers_of_llama3_8b_shape(tmp_path, cpu_kernel):
    out = tmp_path / "cpu_linear.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--batches", "1", "--threads", "1",
                        "--shape", "llama3-8b", "--layers", "1", "--prefill", "32", "--dtype", "bfloat16",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "llama3-8b" and result["layers"] == 1
    assert [e["what"] for e in result["engine"]] == ["decode b1", "prefill 32"]
    assert all(e[k] > 0 for e in result["engine"] for k in ("backend_ms", "unpacked_ms", "f_linear_ms"))
