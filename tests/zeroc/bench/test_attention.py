"""`zeroc bench attention` with tiny sizes: report structure, finite positive ratios, the KIVI path's
quantisation, and bad flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zeroc.bench.attention import (METHODS, AttentionBenchConfig, dequantize_keys, dequantize_values,
                                   quantize_keys, quantize_values)
from zeroc.cli import main


def test_tiny_run_reports_every_method_and_phase(capsys):
    code = main(["bench", "attention", "--shapes", "zeroc-tiny", "--prefill-tokens", "40", "--decode-batch", "2",
                 "--context", "40", "--repeats", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["config"]["prefill_tokens"] == 40 and "machine" in report and "date" in report
    rows = {(r["phase"], r["method"]): r for r in report["rows"]}
    assert set(rows) == {(phase, m) for phase in ("prefill", "decode") for m in METHODS}
    for (phase, method), r in rows.items():
        assert r["shape"] == "zeroc-tiny"
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and 0 < r["ms"] <= r["ms_median"]
    for phase in ("prefill", "decode"):
        assert rows[(phase, "uncompressed")]["ratio"] == 1.0
    assert rows[("decode", "zeroc-fold")]["kv_fraction"] == 0.5  # rank 32 of head_dim 64
    assert rows[("decode", "kivi-4")]["kv_fraction"] == pytest.approx(0.3125)


def test_text_report_is_one_table(capsys):
    assert main(["bench", "attention", "--shapes", "zeroc-tiny", "--prefill-tokens", "8", "--decode-batch", "1",
                 "--context", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| zeroc-tiny | prefill |" in out and "| zeroc-tiny | decode |" in out and "kivi-4 / uncompressed" in out


def test_kivi_codes_round_trip_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 32, 2, 64, generator=gen) * torch.linspace(0.1, 5, 64)  # [blocks, 32 tokens, kv, d]
    codes, scale, zero = quantize_keys(k)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 32, 2, 32) and scale.shape == (3, 1, 2, 64)
    step = scale.float()  # per channel and block
    assert ((dequantize_keys(codes, scale, zero) - k).abs() <= step / 2 + 2e-3 * step + 1e-3).all()
    v = torch.randn(5, 2, 64, generator=gen)
    codes, scale, zero = quantize_values(v)
    assert codes.shape == (5, 2, 32) and scale.shape == (5, 2, 2, 1)  # groups of 32 channels per token
    err = (dequantize_values(codes, scale, zero) - v).abs().unflatten(-1, (2, 32))
    assert (err <= scale.float() / 2 + 1e-3).all()
    levels = torch.arange(16.0).repeat(4)[None, None, :]  # 16 evenly spaced values are exact
    torch.testing.assert_close(dequantize_values(*quantize_values(levels)), levels)


@pytest.mark.parametrize("kwargs, message", [({"rank_ratio": 0.0}, "rank_ratio"), ({"repeats": 0}, "repeats"),
                                             ({"block_size": 16}, "block_size")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionBenchConfig(**kwargs)


def test_cli_bad_flag_exits_2(capsys):
    assert main(["bench", "attention", "--rank-ratio", "1.5", "--shapes", "zeroc-tiny"]) == 2
    assert "zeroc: error: rank_ratio must be in (0, 1]" in capsys.readouterr().err
