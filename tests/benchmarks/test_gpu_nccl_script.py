"""The prepared NCCL GPU check stays runnable between GPU sessions: its CPU-safe parts, here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_nccl.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_names_every_part():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert all(part in out.stdout for part in ("selfsend", "timeout", "serve", "--json"))


@pytest.mark.parametrize("args, words", [
    (["--parts", "allreduce"], "invalid choice: 'allreduce'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--timeout-s", "0"], "--timeout-s > 0"),
])
def test_bad_arguments_exit_2(args, words):
    out = run(*args)
    assert out.returncode == 2 and words in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the no-GPU outcome (exit 2, nothing run); on a GPU the script runs its real checks instead")
def test_without_a_gpu_it_says_so_and_runs_nothing():
    out = run("--parts", "selfsend")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "gpu_nccl.py: error: needs a CUDA GPU (torch sees none); nothing was run"
