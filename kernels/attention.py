"""The runtime's attention entry point: picks the Triton kernel or the PyTorch reference."""

from __future__ import annotations

from torch import Tensor

from kernels.paged_attention import paged_attention_ref


def paged_attention(
    q: Tensor,  # [N, heads, dq] new queries, concatenated over sequences
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B]
    query_start_loc: Tensor,  # [B + 1]
    scale: float,
) -> Tensor:
    """-> [N, heads, dv]. Decode-only batches (one query per sequence) on CUDA run the Triton
    kernel; everything else (prefill, mixed steps, the CPU) runs the reference."""
    if q.is_cuda and q.shape[0] == block_tables.shape[0]:
        from kernels.paged_decode import paged_decode_attention, triton_available  # imports triton: CUDA only

        if triton_available():
            return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
