"""Every autotune config compiles for Hopper without a GPU, fits its shared memory, and reads K/V the way
the design needs: 16-byte asynchronous copies (software-pipelined), no 2-byte scalar loads, tensor cores.

The interpreter cannot show any of this; Triton's own compiler and ptxas (shipped in its wheel) can."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "sm90_compile.py"
HOPPER_SHARED_BYTES = 227 * 1024  # the most one block may take on an H100/H200


def _compile_rows(*kinds: str) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(SCRIPT), *kinds], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_every_config_compiles_for_sm90_with_pipelined_16_byte_copies():
    from zeroc_kernels.paged_decode import DECODE_CONFIGS
    from zeroc_kernels.paged_prefill import PREFILL_CONFIGS

    rows = _compile_rows("decode", "prefill")
    assert len(rows) == len(DECODE_CONFIGS) + len(PREFILL_CONFIGS)
    for row in rows:
        assert row["shared"] <= HOPPER_SHARED_BYTES, row
        assert row["b16_loads"] == 0, row  # K/V rows are never read 2 bytes at a time
        assert row["tensor_core"] > 0, row
        if row["config"].endswith("-s1"):  # no pipelining asked: plain 16-byte loads
            assert row["v4_loads"] > 0, row
        else:
            assert row["cp_async"] > 0, row


def test_the_fused_norm_and_gate_compile_for_sm90_with_16_byte_loads():
    """A decode step's rows (4,096 and 14,336 bf16 values): read and written 16 bytes at a time, by the norm,
    the residual add fused with the norm after it, and the gate."""
    rows = _compile_rows("layer_ops")
    assert [row["kernel"] for row in rows] == ["rms_norm", "add_rms_norm", "silu_mul"]
    for row in rows:
        assert row["v4_loads"] > 0 and row["b16_loads"] == 0, row
