"""`--kv-transport` on `zeroc serve`: demanding NCCL where it cannot work is a one-line error, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what `zeroc serve` does without CUDA (nccl refused with exit 2, auto falls back to gRPC); on a GPU benchmarks/gpu_nccl.py checks the real links")


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeroc.cli", "serve", *args, "--port", "0"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, env, words", [
    (["decode", "--prefill", "127.0.0.1:1", "--kv-transport", "nccl"], {}, "--kv-transport nccl needs a CUDA device"),
    (["prefill", "--kv-transport", "nccl"], {}, "the model runs on cpu"),
    (["prefill"], {"ZEROC_TRANSFER_KV_TRANSPORT": "nccl"}, "--kv-transport nccl needs"),
    (["prefill", "--device", "cuda:0"], {}, "--device cuda:0: torch sees no CUDA device"),
    (["prefill"], {"ZEROC_DEVICE": "tpu"}, "device must be cpu, cuda or cuda:N"),
    (["decode", "--colocated"], {"ZEROC_TRANSFER_KV_TRANSPORT": "rdma"}, "kv_transport must be grpc, nccl or auto"),
])
def test_impossible_transport_settings_exit_2_with_one_line(args, env, words):
    out = serve(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("zeroc: error: ") and words in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""


def test_an_unknown_transport_name_is_refused_by_the_parser():
    out = serve("prefill", "--kv-transport", "rdma")
    assert out.returncode == 2 and "invalid choice: 'rdma'" in out.stderr
