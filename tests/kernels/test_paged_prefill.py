"""The Triton ragged prefill kernel against paged_attention_ref (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from zeroc_kernels.paged_attention import paged_attention_int8_ref, paged_attention_ref
from zeroc_kernels.paged_prefill import paged_prefill_attention

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@settings(max_examples=10, deadline=None)
@given(
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    dims=st.sampled_from([(16, 16), (64, 64), (48, 32), (128, 128)]),
    seqs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(random_paged_kv, block_size, group, dims, seqs, dtype, seed):
    """seqs: (new tokens, cached prefix tokens) per sequence, prefix reuse and decode rows included."""
    dq, dv = dims
    kv_heads = 2
    gen = torch.Generator().manual_seed(seed)
    lens = [q + c for q, c in seqs]
    k_cache, v_cache, block_tables = random_paged_kv(gen, lens, block_size, kv_heads, dq, dv, dtype)
    q_lens = [q for q, _ in seqs]
    seq_lens = torch.tensor(lens)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    q = torch.randn(sum(q_lens), kv_heads * group, dq, generator=gen).to(dtype)
    scale = 1.0 / math.sqrt(64)
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens, starts, scale)
    poisoned = torch.full((sum(q_lens), kv_heads * group, dv), float("nan"), dtype=dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, starts, scale, out=poisoned)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@settings(max_examples=6, deadline=None)
@given(
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    dims=st.sampled_from([(16, 16), (64, 32), (128, 128)]),
    seqs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_int8_cache_read_matches_dequantised_reference(random_paged_kv, int8_pools, block_size, group, dims, seqs,
                                                       dtype, seed):
    """Prefill over an int8 cache (a cached prefix written by `kv_quant`, plus the new tokens)."""
    dq, dv = dims
    kv_heads = 2
    gen = torch.Generator().manual_seed(seed)
    lens = [q + c for q, c in seqs]
    k_cache, v_cache, tables = random_paged_kv(gen, lens, block_size, kv_heads, dq, dv, torch.float32)
    kq, ks, vq, vs = int8_pools(k_cache, v_cache)
    q_lens = [q for q, _ in seqs]
    seq_lens = torch.tensor(lens)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    q = torch.randn(sum(q_lens), kv_heads * group, dq, generator=gen).to(dtype)
    ref = paged_attention_int8_ref(q.float(), kq, vq, ks, vs, tables, seq_lens, starts, 0.1)
    poisoned = torch.full((sum(q_lens), kv_heads * group, dv), float("nan"), dtype=dtype)
    out = paged_prefill_attention(q, kq, vq, tables, seq_lens, starts, 0.1, out=poisoned, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    full = paged_attention_ref(q.float(), k_cache, v_cache, tables, seq_lens, starts, 0.1)
    assert (out.float() - full).abs().max() < 0.05  # int8 approximates the unquantised cache


def test_int8_read_needs_both_scales():
    k = torch.zeros(2, 16, 1, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 caches need both"):
        paged_prefill_attention(torch.zeros(1, 1, 16), k, k, torch.tensor([[0]]), torch.tensor([3]),
                                torch.tensor([0, 1]), 0.1, v_scales=torch.ones(2, 16, 1))
