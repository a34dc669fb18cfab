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
    """-> [N, heads, dv]. On CUDA: decode-only batches (one query per sequence) run the Triton
    decode kernel, other steps the Triton ragged prefill kernel; on the CPU, the reference."""
    if q.is_cuda:
        # Imported here so CPU-only processes never import triton.
        from kernels.paged_decode import paged_decode_attention, triton_available
        from kernels.paged_prefill import paged_prefill_attention

        if triton_available():
            if q.shape[0] == block_tables.shape[0]:
                return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
            return paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
