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

from zeroc_kernels.paged_attention import check_int8_args, paged_attention_int8_ref, paged_attention_ref, rows_contiguous

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


def paged_decode_attention_int8_ref(
    q: Tensor,  # [B, heads, dq]
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq] int8
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv] int8
    k_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    v_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B]
    scale: float,
) -> Tensor:
    """-> [B, heads, dv]: one query per sequence through `paged_attention_int8_ref`."""
    starts = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_int8_ref(q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, starts, scale)


def _unused_pointer(q: Tensor) -> Tensor:
    """A one-element tensor for pointer arguments a kernel's constexpr branch never reads."""
    return torch.zeros(1, dtype=torch.float32, device=q.device)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, scale, split_len,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_sb, stride_ss,
        stride_tb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        DQ: tl.constexpr, DQ_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, INT8: tl.constexpr,
    ):
        # Program (seq, kv_head, split) attends over positions [split * split_len, +split_len) and
        # writes a partial output plus its log-sum-exp; `merge_partials` combines the splits.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
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
        first = split * split_len
        for start in range(first, tl.minimum(seq_len, first + split_len), BLOCK_SIZE):
            block = tl.load(tables_ptr + seq * stride_tb + start // BLOCK_SIZE)
            valid = (start + tok) < seq_len
            k = tl.load(k_ptr + block * stride_kb + tok[:, None] * stride_ks + kv_head * stride_kh + dq[None, :],
                        mask=valid[:, None] & (dq[None, :] < DQ), other=0.0).to(tl.float32)  # [T, DQ]
            v = tl.load(v_ptr + block * stride_vb + tok[:, None] * stride_vs + kv_head * stride_vh + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)  # [T, DV]
            if INT8:  # int8 rows with one fp32 scale per (token, KV head), dequantised in registers
                rows = block * stride_sb + tok * stride_ss + kv_head
                k = k * tl.load(ks_ptr + rows, mask=valid, other=0.0)[:, None]
                v = v * tl.load(vs_ptr + rows, mask=valid, other=0.0)[:, None]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, T]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        empty = l_i == 0.0  # a split past the sequence's end
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (dv[None, :] < DV))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_ok)

    @triton.jit
    def _merge_kernel(
        outs_ptr, lses_ptr, out_ptr, lse_ptr,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_fb,
        S: tl.constexpr, S_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        dv = tl.arange(0, DV_PAD)
        lse = tl.load(lses_ptr + b * stride_lb + h * stride_lh + s, mask=s < S, other=float("-inf"))  # [S]
        parts = tl.load(outs_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + dv[None, :],
                        mask=(s[:, None] < S) & (dv[None, :] < DV), other=0.0).to(tl.float32)  # [S, DV]
        m = tl.max(lse, axis=0)
        w = tl.exp(lse - m)
        total = tl.sum(w, axis=0)
        out = tl.sum(w[:, None] * parts, axis=0) / total
        tl.store(out_ptr + b * stride_ob + h * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)
        tl.store(lse_ptr + b * stride_fb + h, m + tl.log(total))


def merge_partials_ref(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over disjoint key sets. outs: [B, H, S, dv], lses: [B, H, S] -> ([B, H, dv], [B, H])

    Used for split-K decoding and for the two-segment (full-rank tier + compressed tier) merge.
    """
    lse = torch.logsumexp(lses.float(), dim=-1)  # [B, H]
    weights = torch.exp(lses.float() - lse[..., None])  # [B, H, S]
    return (weights[..., None] * outs.float()).sum(-2).to(outs.dtype), lse


def merge_partials(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of `merge_partials_ref` (same shapes)."""
    b, h, s, dv = outs.shape
    outs, lses = outs.contiguous(), lses.float().contiguous()
    out = torch.empty(b, h, dv, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(b, h, dtype=torch.float32, device=outs.device)
    _merge_kernel[(b, h)](
        outs, lses, out, lse,
        outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        S=s, S_PAD=max(2, triton.next_power_of_2(s)), DV=dv, DV_PAD=triton.next_power_of_2(dv),
    )
    return out, lse


# Split-K only pays when the grid would leave SMs idle; below this many blocks per split the
# merge costs more than the extra parallelism buys.
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 16


def choose_num_splits(num_seqs: int, kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """How many context splits fill `num_sms` streaming multiprocessors about twice over: one
    program per (sequence, KV head, split), each split at least MIN_BLOCKS_PER_SPLIT blocks."""
    programs = max(1, num_seqs * kv_heads)
    wanted = -(-2 * num_sms // programs)
    most = max(1, max_blocks // MIN_BLOCKS_PER_SPLIT)
    return max(1, min(wanted, most, MAX_SPLITS))


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float, out: Tensor | None = None,
                           num_splits: int | None = None, k_scales: Tensor | None = None,
                           v_scales: Tensor | None = None) -> Tensor:
    """Triton version of `paged_decode_attention_ref` (same arguments and shapes).

    out: optional [B, heads, dv] buffer (tests poison it to catch unwritten rows).
    k_scales, v_scales: [num_blocks, block_size, kv_heads] fp32 when the caches are int8 as written
    by `kernels.kv_quant.quantize_into_slots`; the kernel dequantises the rows as it reads them,
    so the int8 cache is never expanded in memory (reference: `paged_decode_attention_int8_ref`).
    num_splits > 1 splits each sequence's context across programs (flash-decoding) for long
    contexts with few sequences, then merges the partial results by log-sum-exp; None picks it
    with `choose_num_splits` from the device's SM count (1 off CUDA).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        num_splits = choose_num_splits(q.shape[0], v_cache.shape[2], block_tables.shape[1], sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_seqs, heads, dq = q.shape
    _, block_size, kv_heads, dv = v_cache.shape
    group = heads // kv_heads
    int8 = check_int8_args(k_cache, v_cache, k_scales, v_scales)
    q, k_cache, v_cache = q.contiguous(), rows_contiguous(k_cache), rows_contiguous(v_cache)
    k_scales = k_scales.contiguous() if int8 else _unused_pointer(q)
    v_scales = v_scales.contiguous() if int8 else k_scales
    tables, lens = block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    blocks_per_split = -(-block_tables.shape[1] // num_splits)
    partial = torch.empty(num_seqs, heads, num_splits, dv, dtype=torch.float32 if num_splits > 1 else q.dtype,
                          device=q.device)
    lses = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(num_seqs, kv_heads, num_splits)](
        q, k_cache, v_cache, k_scales, v_scales, tables, lens, partial, lses, scale, blocks_per_split * block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scales.stride(0) if int8 else 0, k_scales.stride(1) if int8 else 0,
        tables.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), lses.stride(0), lses.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=block_size,
        DQ=dq, DQ_PAD=triton.next_power_of_2(dq), DV=dv, DV_PAD=triton.next_power_of_2(dv), INT8=int8,
    )
    result = partial[:, :, 0] if num_splits == 1 else merge_partials(partial, lses)[0].to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
