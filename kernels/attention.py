"""The runtime's entry points: pick the Triton kernel on CUDA, the PyTorch reference elsewhere."""

from __future__ import annotations

from torch import Tensor

from zeroc_kernels.paged_attention import check_int8_args, paged_attention_int8_ref, paged_attention_ref


def use_triton(x: Tensor) -> bool:
    """Whether the runtime runs Triton kernels on `x`'s device: CUDA with triton installed."""
    if not x.is_cuda:
        return False
    # Imported here so CPU-only processes never import triton.
    from zeroc_kernels.paged_decode import triton_available

    return triton_available()


def paged_attention(
    q: Tensor,  # [N, heads, dq] new queries, concatenated over sequences
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq], int8 with k_scales
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv], int8 with v_scales
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B]
    query_start_loc: Tensor,  # [B + 1]
    scale: float,
    k_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32 per-token scales of int8 caches
    v_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32
) -> Tensor:
    """-> [N, heads, dv]. On CUDA: decode-only batches (one query per sequence) run the Triton
    decode kernel, other steps the Triton ragged prefill kernel; on the CPU, the reference. Both
    kernels read int8 caches (kernels/kv_quant.py) in place, dequantising in registers."""
    int8 = check_int8_args(k_cache, v_cache, k_scales, v_scales)
    if use_triton(q):
        from zeroc_kernels.paged_decode import paged_decode_attention
        from zeroc_kernels.paged_prefill import paged_prefill_attention

        if q.shape[0] == block_tables.shape[0]:
            return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                          k_scales=k_scales, v_scales=v_scales)
        return paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                       k_scales=k_scales, v_scales=v_scales)
    if int8:
        return paged_attention_int8_ref(q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens,
                                        query_start_loc, scale)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
