"""Decode attention over the paged (compressed) KV cache: one new query per sequence.

`paged_decode_attention` is the Triton kernel (GPU; runs on the CPU under TRITON_INTERPRET=1
for tests), `paged_decode_attention_ref` its PyTorch reference. K and V may have different
widths (ZeroC keeps fewer Q/K and V dims per layer). One program handles one (sequence,
KV head) pair and all the query heads of that KV head's group, so each K/V block is read once
per group (GQA), with an online softmax over the sequence's blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.paged_attention import paged_attention_ref

try:  # Triton is optional on CPU-only machines; the reference serves there.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def triton_available() -> bool:
    return triton is not None


def paged_decode_attention_ref(
    q: Tensor,  # [B, heads, dq] one query per sequence
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] context length, the new token included
    scale: float,
) -> Tensor:
    """-> [B, heads, dv]"""
    starts = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, starts, scale)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_tb, stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        DQ: tl.constexpr, DQ_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        dq = tl.arange(0, DQ_PAD)
        dv = tl.arange(0, DV_PAD)
        tok = tl.arange(0, BLOCK_SIZE)
        heads = kv_head * GROUP + g
        g_ok = g < GROUP
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dq[None, :],
                    mask=g_ok[:, None] & (dq[None, :] < DQ), other=0.0).to(tl.float32)  # [G, DQ]
        seq_len = tl.load(lens_ptr + seq)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DV_PAD], tl.float32)
        for start in range(0, seq_len, BLOCK_SIZE):
            block = tl.load(tables_ptr + seq * stride_tb + start // BLOCK_SIZE)
            valid = (start + tok) < seq_len
            k = tl.load(k_ptr + block * stride_kb + tok[:, None] * stride_ks + kv_head * stride_kh + dq[None, :],
                        mask=valid[:, None] & (dq[None, :] < DQ), other=0.0).to(tl.float32)  # [T, DQ]
            v = tl.load(v_ptr + block * stride_vb + tok[:, None] * stride_vs + kv_head * stride_vh + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)  # [T, DV]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, T]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (dv[None, :] < DV))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """Triton version of `paged_decode_attention_ref` (same arguments and shapes).

    out: optional [B, heads, dv] buffer to write into (tests poison it to catch unwritten rows).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_seqs, heads, dq = q.shape
    _, block_size, kv_heads, dv = v_cache.shape
    group = heads // kv_heads
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    tables, lens = block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    if out is None:
        out = torch.empty(num_seqs, heads, dv, dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(num_seqs, kv_heads)](
        q, k_cache, v_cache, tables, lens, out, scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size,
        DQ=dq, DQ_PAD=triton.next_power_of_2(dq), DV=dv, DV_PAD=triton.next_power_of_2(dv),
    )
    return out
