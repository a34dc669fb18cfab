"""Causal flash attention for a ragged batch whose K/V live in the paged cache.

Serves prefill (with or without a cached prefix) and mixed prefill + decode steps: sequence b
has q_len[b] new queries at the end of its seq_lens[b]-token context, and the new tokens' K/V
are already in the cache. The reference is `kernels.paged_attention.paged_attention_ref`.
Grid: (sequence, query head, tile of BLOCK_M queries); each program streams its sequence's K/V
in tiles of BLOCK_N positions (gathered through the block table) with an online softmax, and
stops at the causal frontier of its last query.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from zeroc_kernels.paged_attention import check_int8_args, rows_contiguous

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, starts_ptr, out_ptr, scale,
        stride_qn, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_sb, stride_ss,
        stride_tb, stride_on, stride_oh,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DQ: tl.constexpr, DQ_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        DOT_F32: tl.constexpr, INT8: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        tile = tl.program_id(2)
        q_start = tl.load(starts_ptr + seq)
        q_len = tl.load(starts_ptr + seq + 1) - q_start
        if tile * BLOCK_M >= q_len:
            return
        seq_len = tl.load(lens_ptr + seq)
        kv_head = head // GROUP
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
        row_ok = rows < q_len
        q_pos = seq_len - q_len + rows  # absolute position of each query
        dq = tl.arange(0, DQ_PAD)
        dv = tl.arange(0, DV_PAD)
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qn + head * stride_qh + dq[None, :],
                    mask=row_ok[:, None] & (dq[None, :] < DQ), other=0.0)  # [M, DQ]
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
        last = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)  # causal frontier of this tile
        for start in range(0, last, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < last
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=pos_ok, other=0)
            slot = pos % BLOCK_SIZE
            k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                        + dq[None, :], mask=pos_ok[:, None] & (dq[None, :] < DQ), other=0.0)  # [N, DQ]
            v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + dv[None, :], mask=pos_ok[:, None] & (dv[None, :] < DV), other=0.0)  # [N, DV]
            if INT8:  # per-token scales, one per (slot, KV head), both pools laid out alike
                srow = block * stride_sb + slot * stride_ss + kv_head
                k = (k.to(tl.float32) * tl.load(ks_ptr + srow, mask=pos_ok, other=0.0)[:, None]).to(q.dtype)
                v = (v.to(tl.float32) * tl.load(vs_ptr + srow, mask=pos_ok, other=0.0)[:, None]).to(q.dtype)
            if DOT_F32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale  # [M, N]
            visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows see nothing
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_on + head * stride_oh + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def paged_prefill_attention(
    q: Tensor,  # [N, heads, dq] new queries, concatenated over sequences
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] context length, new tokens included
    query_start_loc: Tensor,  # [B + 1]
    scale: float,
    out: Tensor | None = None,  # optional [N, heads, dv] buffer
    block_m: int = 16,
    block_n: int = 32,
    k_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32 when the caches are int8
    v_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32
) -> Tensor:
    """Triton version of `paged_attention_ref` -> [N, heads, dv]; with int8 caches and their scales,
    of `paged_attention_int8_ref` (each K/V tile is dequantised in registers, never in memory)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    int8 = check_int8_args(k_cache, v_cache, k_scales, v_scales)
    n, heads, dq = q.shape
    _, block_size, kv_heads, dv = v_cache.shape
    q, k_cache, v_cache = q.contiguous(), rows_contiguous(k_cache), rows_contiguous(v_cache)
    tables = block_tables.to(torch.int32).contiguous()
    lens, starts = seq_lens.to(torch.int32).contiguous(), query_start_loc.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(n, heads, dv, dtype=q.dtype, device=q.device)
    max_q = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    grid = (tables.shape[0], heads, triton.cdiv(max_q, block_m))
    k_scales = k_scales.contiguous() if int8 else torch.zeros(1, dtype=torch.float32, device=q.device)
    v_scales = v_scales.contiguous() if int8 else k_scales
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, k_scales, v_scales, tables, lens, starts, out, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scales.stride(0) if int8 else 0, k_scales.stride(1) if int8 else 0,
        tables.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DQ=dq, DQ_PAD=max(16, triton.next_power_of_2(dq)), DV=dv, DV_PAD=max(16, triton.next_power_of_2(dv)),
        # Triton's CPU interpreter computes bf16/fp16 tl.dot wrongly (seen with triton 3.9): there,
        # upcast the operands; on a GPU half-precision dots run on the tensor cores.
        DOT_F32=os.environ.get("TRITON_INTERPRET") == "1", INT8=int8,
    )
    return out
