"""int8 KV quantisation kernels against their references (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc_kernels.kv_quant import dequantize_slots, dequantize_slots_ref, quantize_into_slots, quantize_into_slots_ref


def _pools(blocks, block_size, heads, d, scales_head_major=False):
    scales = torch.full((blocks, heads, block_size) if scales_head_major else (blocks, block_size, heads), float("nan"))
    return (torch.full((blocks, block_size, heads, d), -128, dtype=torch.int8),  # poisoned: -128 is never written
            scales.transpose(1, 2) if scales_head_major else scales)  # head-major: as the serving pools keep them


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), heads=st.sampled_from([1, 2, 8]), d=st.sampled_from([16, 48, 64, 128]),
       block_size=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scales_head_major=st.booleans(), seed=st.integers(0, 2**16))
def test_kernels_match_references_and_error_is_bounded(n, heads, d, block_size, dtype, scales_head_major, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-n // block_size) + 2
    x = (torch.randn(n, heads, d, generator=gen) * torch.rand(n, heads, 1, generator=gen) * 10).to(dtype)
    x[0, 0] = 0  # an all-zero row must not divide by zero
    slots = torch.randperm(blocks * block_size, generator=gen)[:n]
    q_ref, s_ref = _pools(blocks, block_size, heads, d)
    q_tri, s_tri = _pools(blocks, block_size, heads, d, scales_head_major)
    quantize_into_slots_ref(x, slots, q_ref, s_ref)
    quantize_into_slots(x, slots, q_tri, s_tri)
    torch.testing.assert_close(s_tri, s_ref, equal_nan=True)
    assert (q_tri.int() - q_ref.int()).abs().max() <= 1  # a rounding tie may land either side
    back = dequantize_slots(q_tri, s_tri, slots, torch.float32)
    torch.testing.assert_close(back, dequantize_slots_ref(q_tri, s_tri, slots, torch.float32))
    # Per row, the error is at most half a quantisation step.
    step = s_ref.view(-1, heads)[slots][..., None]
    assert ((back - x.float()).abs() <= step * 0.5001 + 1e-6).all()
    assert back[0, 0].abs().sum() == 0
