"""int8 per-token quantisation: a hand-checked row, the kernels' numerics, the byte count on plain and
ZeroC-compressed models, and the budget it can reach."""

from __future__ import annotations

import pytest
import torch

from zeroc_kernels.kv_quant import dequantize_slots_ref, quantize_into_slots_ref
from zeroc.config import BUNDLED_HELDOUT
from zeroc.data import read_eval_tokens
from zeroc.loader import load_model
from oracle.base import LayerGeometry, attend_dense
from oracle.int8 import Int8, Int8Cache, quantize_rows
from oracle.kivi import KIVI
from oracle.streaming import perplexity_with_policy


def test_a_row_by_hand():
    # max|x| = 63.5 -> scale 0.5; 25.25 / 0.5 = 50.5 rounds away from zero to 51, -0.75 / 0.5 = -1.5 to -2
    x = torch.tensor([[63.5, 25.25, -0.75, 0.0]], dtype=torch.float64)
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert codes.tolist() == [[127, 51, -2, 0]]
    assert scale.item() == 0.5
    zeros, zscale = quantize_rows(torch.zeros(1, 4))
    assert zeros.tolist() == [[0, 0, 0, 0]] and zscale.item() == 0.0


def test_same_numerics_as_the_serving_kernels_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 2, 24, generator=g) * torch.linspace(0.1, 5, 10)[:, None, None]  # [N, kv_heads, d]
    q_pool = torch.zeros(4, 4, 2, 24, dtype=torch.int8)
    s_pool = torch.zeros(4, 4, 2)
    slots = torch.arange(10)
    quantize_into_slots_ref(x, slots, q_pool, s_pool)
    codes, scale = quantize_rows(x)
    assert torch.equal(codes, q_pool.view(-1, 2, 24)[:10])
    assert torch.equal(scale, s_pool.view(-1, 2)[:10])
    cache = Int8Cache(LayerGeometry(0, 2, 2, 24, 24), batch=1, dtype=torch.float32)
    q = torch.randn(1, 2, 24, generator=g)
    for t in range(10):
        out = cache.step(q, x[t][None], x[t][None], 0.2, t)
    deq = dequantize_slots_ref(q_pool, s_pool, slots, torch.float32)  # [10, kv, d]
    want = attend_dense(q, deq.permute(1, 0, 2)[None], deq.permute(1, 0, 2)[None], 0.2)[0]
    assert torch.equal(out, want)
    assert (cache.k[0, :, :10].permute(1, 0, 2) - x).abs().max() <= scale.max() / 2 + 1e-6


def test_bytes_by_hand():
    geom = LayerGeometry(layer=0, heads=4, kv_heads=2, k_dim=64, v_dim=32)
    cache = Int8Cache(geom, batch=1, dtype=torch.float32)
    for t in range(5):
        cache.step(torch.randn(1, 4, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 32), 0.125, t)
    # 5 tokens x 2 KV heads x ((64 + 32) codes x 8 bits + 2 fp32 scales)
    assert cache.stored_bits() == 5 * 2 * (96 * 8 + 64)


def test_fraction_on_the_plain_and_on_a_compressed_model(bundled, zeroc_half_dir):
    # head_dim 64: (2 x 64 x 8 + 2 x 32) / (2 x 64 x 16) = 1088 / 2048
    assert Int8().fraction(bundled.model) == pytest.approx(1088 / 2048)
    half = load_model(zeroc_half_dir).model  # every layer at rank 32 of 64 for Q/K and V
    assert Int8().fraction(half) == pytest.approx((2 * 32 * 8 + 64) / 2048)
    assert Int8(budget=0.5).max_width_fraction(bundled.model) == pytest.approx((1024 - 64) / 1024)
    assert Int8(budget=0.75).max_width_fraction(bundled.model) > 1.0
    with pytest.raises(ValueError, match="0.5312"):
        Int8(budget=0.5).prepare(bundled.model)
    Int8(budget=0.3125).prepare(half)  # exactly (512 + 64) / 2048 = 0.28125 <= 0.3125
    with pytest.raises(ValueError, match="budget"):
        Int8(budget=0.0)


def test_streaming_on_a_compressed_model_counts_true_bytes_and_loses_little(zeroc_half_dir):
    loaded = load_model(zeroc_half_dir)
    tokens = read_eval_tokens(loaded.tokenizer, BUNDLED_HELDOUT, max_tokens=130)
    plain = perplexity_with_policy(loaded.model, tokens, 64, KIVI(budget=1.0, bits=4), 4, progress=False)
    res = perplexity_with_policy(loaded.model, tokens, 64, Int8(budget=0.3), 4, progress=False)
    # fractions are of the source model's fp16 cache: the fp16 compressed cache holds 0.5, int8 0.28125
    assert plain.kv_fraction_mean == pytest.approx(0.5)
    assert res.kv_fraction_mean == pytest.approx(576 / 2048)
    assert res.perplexity != plain.perplexity
    assert abs(res.perplexity / plain.perplexity - 1) < 0.01
