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


def test_int8_decode_reads_v_codes_as_words_without_byte_loads_or_spills():
    """int8 decode at Llama-3-8B widths (128 bytes of codes per row). P @ V takes V's tile as its second operand;
    read as bytes, the codes reached that layout through one-byte shared-memory loads (32-128 a thread per tile)
    with 231-255 registers and spills at the tiles the H100 picked. Read as int32 words and split in registers
    (the default), none, and at most 142 registers. With P @ V transposed (an experiment), V^T is wgmma's register
    operand, its codes loaded 16 bytes at a time; on an H100 the plain byte form was faster all the same
    (docs/benchmarks.md)."""
    from zeroc_kernels.paged_decode import DECODE_CONFIGS

    rows = _compile_rows("decode_int8")
    assert len(rows) == 3 * len(DECODE_CONFIGS)
    by_form = {(row["pv_transposed"], row["v_words"], row["config"]): row for row in rows}
    for row in rows:
        assert row["shared"] <= HOPPER_SHARED_BYTES and row["b16_loads"] == 0, row
    for config in {row["config"] for row in rows}:
        words, by_bytes = by_form[False, True, config], by_form[False, False, config]
        transposed = by_form[True, False, config]
        assert words["byte_shared_loads"] == 0 and by_bytes["byte_shared_loads"] >= 32, (words, by_bytes)
        if "registers" in words:  # cuobjdump ships in Triton's wheel
            assert words["registers"] < by_bytes["registers"], (words, by_bytes)
            assert words["stack"] == 0 or config.endswith("-s1"), words
        assert transposed["wgmma"] > 0 and words["wgmma"] == by_bytes["wgmma"] == 0, config


def test_the_fused_norm_and_gate_compile_for_sm90_with_16_byte_loads():
    """A decode step's rows (4,096 and 14,336 bf16 values): read and written 16 bytes at a time, by the norm,
    the residual add fused with the norm after it, and the gate."""
    rows = _compile_rows("layer_ops")
    assert [row["kernel"] for row in rows] == ["rms_norm", "add_rms_norm", "silu_mul"]
    for row in rows:
        assert row["v4_loads"] > 0 and row["b16_loads"] == 0, row


def test_the_token_tier_and_rope_kernels_compile_for_sm90():
    """The tier's decode segment scores and reads its gathered rows on the tensor cores; RoPE alone and a fold tier
    layer's joined q, k, v read rows at least 4 bytes at a time, and spill nothing. (Under the interpreter, a
    kernel reading a module global compiled; Triton's compiler refuses it: this is where that shows.)"""
    rows = {row["kernel"]: row for row in _compile_rows("tier")}
    assert rows.keys() == {"tier_decode", "rope", "tier_qkv"}
    assert rows["tier_decode"]["tensor_core"] > 0 and rows["tier_decode"]["shared"] <= HOPPER_SHARED_BYTES
    # Block ids (int64) are read once per row: a slot's cache block, its offset, the borrowed block(s) of its tier
    # row. Looked up per element, as the kernel first did, each thread made 258 such loads and spilled 504 bytes.
    assert rows["tier_decode"]["b64_loads"] <= 8, rows["tier_decode"]
    if "stack" in rows["tier_decode"]:  # cuobjdump ships in Triton's wheel
        assert rows["tier_decode"]["stack"] == 0, rows["tier_decode"]  # no register spilled
    assert all(row["b16_loads"] == 0 for row in rows.values()), rows
    assert all(row.get("stack", 0) == 0 for row in rows.values()), rows


def test_the_other_kernels_compile_for_sm90_and_read_rows_in_tiles():
    """Both QKV epilogues, the split-K merge, the int8 pools' quantise and dequantise, and the token mask. The fold
    epilogue and the int8 kernels read each row 2 bytes at a time while they ran one program per row (and head); in
    tiles of rows they read 16 bytes at a time."""
    rows = {row["kernel"]: row for row in _compile_rows("others")}
    assert rows.keys() == {"qkv_epilogue", "qkv_rotate_epilogue", "merge", "quantize", "dequantize", "token_bitmask"}
    assert rows["token_bitmask"].get("stack", 0) == 0, rows["token_bitmask"]
    for name in ("qkv_epilogue", "quantize", "dequantize"):
        assert rows[name]["b16_loads"] == 0 and rows[name]["v4_loads"] > 0, rows[name]
    assert rows["qkv_rotate_epilogue"]["tensor_core"] > 0
    assert all(row["shared"] <= HOPPER_SHARED_BYTES for row in rows.values()), rows
