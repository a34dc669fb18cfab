"""KIVI: quantisation error bounds, group layout, the byte count and the budget it can reach."""

from __future__ import annotations

import pytest
import torch

from oracle.base import LayerGeometry, attend_dense, full_bits
from oracle.kivi import KIVI, KIVICache, fake_quantize, quantize_keys, quantize_values

GEOM = LayerGeometry(layer=0, heads=2, kv_heads=1, k_dim=64, v_dim=64)


def test_levels_are_exact_and_the_error_is_at_most_half_a_step():
    x = torch.arange(16.0).view(1, 16) * 0.5 - 3.0  # 16 evenly spaced values: exactly the 4-bit levels
    assert torch.equal(fake_quantize(x, 4, -1), x)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 32, generator=g, dtype=torch.float64)
    for bits in (2, 4):
        step = (y.amax(-1, keepdim=True) - y.amin(-1, keepdim=True)) / (2 ** bits - 1)
        assert ((fake_quantize(y, bits, -1) - y).abs() <= step / 2 + 1e-12).all()


def test_keys_share_a_scale_per_channel_and_values_per_token_group():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, 32, 64, generator=g)  # one group of 32 tokens
    kq = quantize_keys(k, 2)
    assert all(kq[0, 0, :, c].unique().numel() <= 4 for c in range(64))  # per channel: <= 2**2 levels
    assert any(kq[0, 0, t, :].unique().numel() > 4 for t in range(32))  # not per token
    v = torch.randn(1, 1, 5, 64, generator=g)
    vq = quantize_values(v, 2, 32)
    for t in range(5):
        for lo in (0, 32):
            assert vq[0, 0, t, lo: lo + 32].unique().numel() <= 4  # per token, per group of 32 channels


def test_budget_reached_by_each_bit_width():
    assert KIVI(budget=1.0, bits=4).quantised_fraction == pytest.approx((4 + 1) / 16)  # 4 bits + 32 bits / 32
    assert KIVI(budget=1.0, bits=2).quantised_fraction == pytest.approx((2 + 1) / 16)
    with pytest.raises(ValueError, match="0.3125"):
        KIVI(budget=0.25, bits=4)
    with pytest.raises(ValueError, match="bits"):
        KIVI(bits=3)


def feed(policy: KIVI, steps: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    cache = KIVICache(policy, GEOM, batch=1, dtype=torch.float32)
    outs = []
    for t in range(steps):
        q = torch.randn(1, 2, 64, generator=g)
        k, v = torch.randn(1, 1, 64, generator=g), torch.randn(1, 1, 64, generator=g)
        outs.append((q, k, v, cache.step(q, k, v, 0.125, t)))
    return cache, outs


def test_byte_count_by_hand_at_256_tokens():
    cache, _ = feed(KIVI(budget=0.5, bits=4), 256)
    # Hand count: 192 tokens quantised (6 key groups of 32), 64 at full precision, per 64 dims:
    # keys 64*64*16 + 192*64*4 + 6*64*32 = 126976 bits; values 64*64*16 + 192*(64*4 + 2*32) = 126976.
    assert (cache.k_done, cache.v_done) == (192, 192)
    assert cache.stored_bits() == 126976 + 126976
    assert cache.stored_bits() <= 0.5 * full_bits(GEOM, 256)  # 262144


def test_a_fixed_residual_quantises_whole_groups_behind_it():
    """residual=32: the filling group and one full group stay at full precision, whatever the budget."""
    policy = KIVI(bits=4, residual=32)
    for steps, done in ((31, 0), (64, 32), (95, 32), (96, 64), (100, 64)):
        cache, _ = feed(policy, steps)
        assert (cache.k_done, cache.v_done) == (done, done)
    with pytest.raises(ValueError, match="multiple of the group"):
        KIVI(residual=40)


def test_the_cache_stays_within_budget_once_a_key_group_fits():
    policy = KIVI(budget=0.5, bits=2)
    g = torch.Generator().manual_seed(3)
    cache = KIVICache(policy, GEOM, batch=1, dtype=torch.float32)
    for t in range(300):
        cache.step(torch.randn(1, 2, 64, generator=g), torch.randn(1, 1, 64, generator=g),
                   torch.randn(1, 1, 64, generator=g), 0.125, t)
        if t + 1 >= 64:
            assert cache.stored_bits() <= 0.5 * full_bits(GEOM, t + 1) + 1e-6


def test_budget_one_is_exact_and_quantised_attention_is_close():
    cache, outs = feed(KIVI(budget=1.0, bits=2), 40)
    ks = torch.stack([k for _, k, _, _ in outs], dim=2)  # [1, 1, 40, 64]
    vs = torch.stack([v for _, _, v, _ in outs], dim=2)
    q, _, _, out = outs[-1]
    assert torch.allclose(out, attend_dense(q, ks, vs, 0.125)[0], atol=1e-6)
    assert cache.k_done == cache.v_done == 0
    cache4, outs4 = feed(KIVI(budget=0.3125, bits=4), 40)
    assert cache4.k_done == 32 and cache4.v_done == 40  # no window left: everything that can be is quantised
    err = (outs4[-1][3] - out).abs().max()
    assert 0 < err < 0.2  # quantised, so not exact, but close
