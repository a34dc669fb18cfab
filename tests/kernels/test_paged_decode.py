"""The Triton decode-attention kernel against its PyTorch reference (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import paged_attention
from kernels.paged_decode import paged_decode_attention, paged_decode_attention_ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@settings(max_examples=12, deadline=None)
@given(
    block_size=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    kv_heads=st.sampled_from([1, 2]),
    dims=st.sampled_from([(16, 16), (64, 64), (48, 32), (128, 128)]),
    lens=st.lists(st.integers(1, 100), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(block_size, group, kv_heads, dims, lens, dtype, seed):
    dq, dv = dims
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dq, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dv, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    width = max(need)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    seq_lens = torch.tensor(lens)
    q = torch.randn(len(lens), kv_heads * group, dq, generator=gen).to(dtype)
    scale = 1.0 / math.sqrt(64)
    ref = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens, scale)
    poisoned = torch.full((len(lens), kv_heads * group, dv), float("nan"), dtype=dtype)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=poisoned)
    assert out.dtype == dtype and out.shape == (len(lens), kv_heads * group, dv)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_runtime_dispatch_uses_the_reference_on_cpu_and_matches_the_kernel():
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(4, 16, 2, 32, generator=gen), torch.randn(4, 16, 2, 16, generator=gen)
    q = torch.randn(2, 8, 32, generator=gen)
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([20, 32])
    starts = torch.tensor([0, 1, 2])
    via_runtime = paged_attention(q, k_cache, v_cache, tables, lens, starts, scale=0.1)
    torch.testing.assert_close(via_runtime, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.1))
    torch.testing.assert_close(via_runtime, paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1),
                               atol=1e-5, rtol=1e-5)
