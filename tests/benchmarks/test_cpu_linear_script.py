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
                        "--calls", "2", "--steps", "3", "--prefill", "64", "--dtype", dtype, "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    sides = ("backend_ms", "unpacked_ms", "f_linear_ms")
    assert len(result["gemms"]) == 12 and all(g[k] > 0 for g in result["gemms"] for k in sides)
    assert all(e[k] > 0 for e in result["engine"] for k in sides)
    assert [e["what"] for e in result["engine"]] == ["decode b2", "prefill 64"]
    assert result["dtype"] == dtype and result["packed"] == (getattr(torch, dtype) in PACKED_DTYPES)
    assert len(r.stdout.splitlines()) == 15
    _check_memory(result)


def test_gemms_only_stops_after_the_gemm_rows(tmp_path):
    out = tmp_path / "cpu_linear.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--batches", "1", "4", "--threads", "1", "--calls", "1",
                        "--gemms-only", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "engine" not in result and "memory" not in result
    assert [(g["gemm"], g["m"]) for g in result["gemms"][-4:]] == [
        ("llama3-8b gate_up fused", 1), ("llama3-8b gate_up fused", 4), ("llama3-8b down", 1), ("llama3-8b down", 4)]
    assert len(r.stdout.splitlines()) == 24


def test_the_engine_rows_run_on_layers_of_llama3_8b_shape(tmp_path, cpu_kernel):
    out = tmp_path / "cpu_linear.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--batches", "1", "--threads", "1",
                        "--calls", "1", "--steps", "2", "--shape", "llama3-8b", "--layers", "1", "--prefill", "32",
                        "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "llama3-8b" and result["layers"] == 1
    assert [e["what"] for e in result["engine"]] == ["decode b1", "prefill 32"]
    assert all(e[k] > 0 for e in result["engine"] for k in ("backend_ms", "unpacked_ms", "f_linear_ms"))
    _check_memory(result)


def _check_memory(result: dict) -> None:
    """A served model drops the plain weights of what it packed (at least half of that shows in the resident memory);
    where nothing packs (bf16 without oneDNN's bf16 kernels), nothing is."""
    memory = result["memory"]
    assert (memory["packed_gib"] > 0) == result["packed"]
    if result["packed"]:
        assert memory["kept_gib"] - memory["released_gib"] >= memory["packed_gib"] / 2
