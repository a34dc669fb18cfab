"""The QKV epilogue of a fold-mode (ZeroC) attention layer, in one pass over the GEMM output.

After the rank-reduced QKV projection: RoPE on the kept pairs of q and k (each KV head keeps
its own pairs, so each has its own frequencies; query heads use their group's), then K and V
go straight into their paged cache slots. No full-width K ever exists in memory.
Layout of a compressed head: kept first halves, then kept second halves (rotate_half pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _rope_ref(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    # x: [N, heads, r]; positions: [N]; inv_freq: [heads or 1, r/2]
    freqs = positions.float()[:, None, None] * inv_freq.float()  # [N, heads|1, r/2]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1).float()
    return (x.float() * cos + rotated * sin).to(x.dtype)


def qkv_epilogue_ref(
    q: Tensor,  # [N, heads, r] from the GEMM, before RoPE
    k: Tensor,  # [N, kv_heads, r]
    v: Tensor,  # [N, kv_heads, rv]
    positions: Tensor,  # [N]
    inv_freq: Tensor,  # [kv_heads, r/2] frequencies of each KV head's kept pairs
    slot_mapping: Tensor,  # [N]
    k_pool: Tensor,  # [num_blocks, block_size, kv_heads, r], written in place
    v_pool: Tensor,  # [num_blocks, block_size, kv_heads, rv], written in place
) -> Tensor:
    """-> q after RoPE [N, heads, r]; K (after RoPE) and V land in their cache slots."""
    group = q.shape[1] // k.shape[1]
    k_pool.view(-1, *k_pool.shape[2:])[slot_mapping] = _rope_ref(k, positions, inv_freq).to(k_pool.dtype)
    v_pool.view(-1, *v_pool.shape[2:])[slot_mapping] = v.to(v_pool.dtype)
    return _rope_ref(q, positions, inv_freq.repeat_interleave(group, 0))


if triton is not None:

    @triton.jit
    def _rope_row(x_ptr, freq_ptr, pos, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        i = tl.arange(0, HALF_PAD)
        ok = i < HALF
        lo = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
        angle = pos * tl.load(freq_ptr + i, mask=ok, other=0.0)
        c, s = tl.cos(angle), tl.sin(angle)
        return lo * c - hi * s, hi * c + lo * s, i, ok

    @triton.jit
    def _qkv_epilogue_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, freq_ptr, slots_ptr, kpool_ptr, vpool_ptr, qout_ptr,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        HEADS: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        RV: tl.constexpr, RV_PAD: tl.constexpr,
    ):
        # One program per (token, query head); the first query head of each group also writes K/V.
        n = tl.program_id(0)
        h = tl.program_id(1)
        g = h // (HEADS // KV)
        pos = tl.load(pos_ptr + n).to(tl.float32)
        freq = freq_ptr + g * HALF
        lo, hi, i, ok = _rope_row(q_ptr + n * stride_qn + h * stride_qh, freq, pos, HALF, HALF_PAD)
        out = qout_ptr + (n * HEADS + h) * 2 * HALF
        tl.store(out + i, lo.to(qout_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HALF + i, hi.to(qout_ptr.dtype.element_ty), mask=ok)
        if h % (HEADS // KV) == 0:
            slot = tl.load(slots_ptr + n)
            klo, khi, i, ok = _rope_row(k_ptr + n * stride_kn + g * stride_kh, freq, pos, HALF, HALF_PAD)
            kdst = kpool_ptr + (slot * KV + g) * 2 * HALF
            tl.store(kdst + i, klo.to(kpool_ptr.dtype.element_ty), mask=ok)
            tl.store(kdst + HALF + i, khi.to(kpool_ptr.dtype.element_ty), mask=ok)
            j = tl.arange(0, RV_PAD)
            vrow = tl.load(v_ptr + n * stride_vn + g * stride_vh + j, mask=j < RV, other=0.0)
            tl.store(vpool_ptr + (slot * KV + g) * RV + j, vrow.to(vpool_ptr.dtype.element_ty), mask=j < RV)


def qkv_epilogue(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor, slot_mapping: Tensor,
                 k_pool: Tensor, v_pool: Tensor) -> Tensor:
    """Triton version of `qkv_epilogue_ref` (same arguments; pools must be contiguous)."""
    n, heads, r = q.shape
    kv, rv = k.shape[1], v.shape[2]
    out = torch.empty_like(q)
    _qkv_epilogue_kernel[(n, heads)](
        q, k, v, positions.contiguous(), inv_freq.float().contiguous(), slot_mapping.contiguous(), k_pool, v_pool,
        out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEADS=heads, KV=kv, HALF=r // 2, HALF_PAD=triton.next_power_of_2(r // 2), RV=rv,
        RV_PAD=triton.next_power_of_2(rv),
    )
    return out
