"""The Triton decode-attention kernel against its PyTorch reference (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc_kernels.attention import TorchBackend, TritonBackend
from zeroc_kernels.paged_decode import (MAX_SPLITS, MIN_BLOCKS_PER_SPLIT, choose_num_splits, merge_partials,
                                  merge_partials_ref, paged_decode_attention, paged_decode_attention_int8_ref,
                                  paged_decode_attention_ref)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@settings(max_examples=12, deadline=None)
@given(
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    kv_heads=st.sampled_from([1, 2]),
    dims=st.sampled_from([(16, 16), (64, 64), (48, 32), (128, 128)]),
    lens=st.lists(st.integers(1, 100), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    num_splits=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(random_paged_kv, block_size, group, kv_heads, dims, lens, dtype, num_splits,
                                  seed):
    dq, dv = dims
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, block_tables = random_paged_kv(gen, lens, block_size, kv_heads, dq, dv, dtype)
    seq_lens = torch.tensor(lens)
    q = torch.randn(len(lens), kv_heads * group, dq, generator=gen).to(dtype)
    scale = 1.0 / math.sqrt(64)
    ref = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens, scale)
    poisoned = torch.full((len(lens), kv_heads * group, dv), float("nan"), dtype=dtype)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=poisoned,
                                 num_splits=num_splits)
    assert out.dtype == dtype and out.shape == (len(lens), kv_heads * group, dv)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_both_backends_run_decode_steps_alike():
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(4, 16, 2, 32, generator=gen), torch.randn(4, 16, 2, 16, generator=gen)
    q = torch.randn(2, 8, 32, generator=gen)
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([20, 32])
    starts = torch.tensor([0, 1, 2])
    via_torch = TorchBackend().paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.1)
    via_triton = TritonBackend().paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.1)
    torch.testing.assert_close(via_torch, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.1))
    torch.testing.assert_close(via_triton, paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_triton, via_torch, atol=1e-5, rtol=1e-5)


def test_two_segment_merge_equals_attention_over_the_union():
    """Attention over [sinks/recent tier] and [compressed tier] merged by LSE == attention over both."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 16, generator=gen)  # [B, heads, d]
    keys = torch.randn(3, 40, 4, 16, generator=gen)
    vals = torch.randn(3, 40, 4, 8, generator=gen)

    def attend(k, v):  # -> out [B, H, dv], lse [B, H]
        s = torch.einsum("bhd,bthd->bht", q, k) * 0.25
        return torch.einsum("bht,bthd->bhd", s.softmax(-1), v), torch.logsumexp(s, -1)

    whole, whole_lse = attend(keys, vals)
    a, la = attend(keys[:, :13], vals[:, :13])
    b, lb = attend(keys[:, 13:], vals[:, 13:])
    outs, lses = torch.stack([a, b], 2), torch.stack([la, lb], 2)
    for merge in (merge_partials_ref, merge_partials):
        out, lse = merge(outs, lses)
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_auto_split_count_fills_the_gpu_without_tiny_splits():
    # Decode batch 64 x 8 KV heads already gives 512 programs: no split on a 132-SM H100.
    assert choose_num_splits(64, 8, 512, 132) == 1
    # One long sequence: split until ~2x the SMs are busy, capped.
    assert choose_num_splits(1, 8, 512, 132) == 16
    assert choose_num_splits(2, 8, 512, 132) == 16 and choose_num_splits(4, 8, 512, 132) == 9
    # Short contexts are never cut below MIN_BLOCKS_PER_SPLIT blocks per split.
    assert choose_num_splits(1, 8, 8, 132) == 8 // MIN_BLOCKS_PER_SPLIT
    assert choose_num_splits(1, 1, 3, 132) == 1
    for seqs, heads, blocks, sms in [(1, 1, 1000, 1000), (3, 2, 40, 7), (128, 8, 1, 132)]:
        n = choose_num_splits(seqs, heads, blocks, sms)
        assert 1 <= n <= MAX_SPLITS and (n == 1 or blocks // n >= MIN_BLOCKS_PER_SPLIT)


@settings(max_examples=8, deadline=None)
@given(
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    dims=st.sampled_from([(16, 16), (64, 32), (128, 128)]),
    lens=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    num_splits=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_int8_cache_read_matches_dequantised_reference(random_paged_kv, int8_pools, block_size, group, dims, lens,
                                                       dtype, num_splits, seed):
    dq, dv = dims
    kv_heads = 2
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = random_paged_kv(gen, lens, block_size, kv_heads, dq, dv, torch.float32)
    kq, ks, vq, vs = int8_pools(k_cache, v_cache)
    q = torch.randn(len(lens), kv_heads * group, dq, generator=gen).to(dtype)
    lens_t = torch.tensor(lens)
    ref = paged_decode_attention_int8_ref(q.float(), kq, vq, ks, vs, tables, lens_t, 0.1)
    out = paged_decode_attention(q, kq, vq, tables, lens_t, 0.1, num_splits=num_splits, k_scales=ks, v_scales=vs,
                                 out=torch.full((len(lens), kv_heads * group, dv), float("nan"), dtype=dtype))
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    # int8 is an approximation of the unquantised cache, close at these magnitudes.
    full = paged_decode_attention_ref(q.float(), k_cache, v_cache, tables, lens_t, 0.1)
    assert (out.float() - full).abs().max() < 0.05


def test_int8_read_needs_both_scales():
    k = torch.zeros(2, 16, 1, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 caches need both"):
        paged_decode_attention(torch.zeros(1, 1, 16), k, k, torch.tensor([[0]]), torch.tensor([3]), 0.1,
                               k_scales=torch.ones(2, 16, 1))
