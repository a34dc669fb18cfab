"""int8 per-token quantisation of (compressed) KV, fused with the paged cache write and read.

Each (token, KV head) row of width d is stored as int8 with one fp32 scale = max|x| / 127,
rounded half away from zero: 4x fewer bytes than fp32 (2x fewer than bf16) on the wire and in
the cache, on top of ZeroC's rank reduction. `quantize_into_slots` / `dequantize_slots` are the
Triton kernels, the `*_ref` functions their references.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def quantize_rows_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: [..., d] -> (codes [..., d] int8, scale [...] fp32); `dequantize_rows_ref` inverts up to scale / 2.
    The numerics every int8 path shares: the kernels, the serving int8 pools, the int8 evaluator."""
    scale = x.float().abs().amax(-1) / 127.0
    y = x.float() / torch.where(scale == 0, 1.0, scale)[..., None]
    codes = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_rows_ref(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """codes: [..., d] int8; scale: [...] fp32 -> [..., d] in `dtype`."""
    return (codes.float() * scale[..., None]).to(dtype)


def quantize_into_slots_ref(
    x: Tensor,  # [N, kv_heads, d] new K or V rows
    slot_mapping: Tensor,  # [N] flat slot of each row
    q_pool: Tensor,  # [num_blocks, block_size, kv_heads, d] int8, written in place
    scale_pool: Tensor,  # [num_blocks, block_size, kv_heads] fp32 (any strides: serving keeps it head-major)
) -> None:
    q, scale = quantize_rows_ref(x)  # [N, kv_heads, d], [N, kv_heads]
    q_pool.view(-1, *q_pool.shape[2:])[slot_mapping] = q
    bs = scale_pool.shape[1]
    scale_pool[slot_mapping // bs, slot_mapping % bs] = scale


def dequantize_slots_ref(q_pool: Tensor, scale_pool: Tensor, slot_mapping: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows at `slot_mapping` ([N]) back to `dtype` -> [N, kv_heads, d]"""
    q = q_pool.view(-1, *q_pool.shape[2:])[slot_mapping]
    bs = scale_pool.shape[1]
    return dequantize_rows_ref(q, scale_pool[slot_mapping // bs, slot_mapping % bs], dtype)


if triton is not None:

    @triton.jit
    def _quantize_kernel(x_ptr, slots_ptr, q_ptr, s_ptr, n, stride_xn, stride_xh, stride_sb, stride_ss, stride_sh,
                         D: tl.constexpr, D_PAD: tl.constexpr, H: tl.constexpr, BS: tl.constexpr,
                         BLOCK_R: tl.constexpr):
        # Program: BLOCK_R rows of one KV head, as [BLOCK_R, D] tiles (one row per program read it 2 bytes at a
        # time on sm_90), each row's scale its own max.
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        head = tl.program_id(1)
        d = tl.arange(0, D_PAD)[None, :]
        ok = r < n
        m = ok[:, None] & (d < D)
        x = tl.load(x_ptr + r[:, None] * stride_xn + head * stride_xh + d, mask=m, other=0.0).to(tl.float32)
        scale = tl.max(tl.abs(x), axis=1) / 127.0  # [R]
        y = x / tl.where(scale == 0.0, 1.0, scale)[:, None]
        q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        slot = tl.load(slots_ptr + r, mask=ok, other=0).to(tl.int64)
        tl.store(q_ptr + (slot[:, None] * H + head) * D + d, q.to(tl.int8), mask=m)
        tl.store(s_ptr + (slot // BS) * stride_sb + (slot % BS) * stride_ss + head * stride_sh, scale, mask=ok)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, slots_ptr, out_ptr, n, stride_on, stride_oh, stride_sb, stride_ss,
                           stride_sh, D: tl.constexpr, D_PAD: tl.constexpr, H: tl.constexpr, BS: tl.constexpr,
                           BLOCK_R: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        head = tl.program_id(1)
        d = tl.arange(0, D_PAD)[None, :]
        ok = r < n
        m = ok[:, None] & (d < D)
        slot = tl.load(slots_ptr + r, mask=ok, other=0).to(tl.int64)
        q = tl.load(q_ptr + (slot[:, None] * H + head) * D + d, mask=m, other=0).to(tl.float32)
        scale = tl.load(s_ptr + (slot // BS) * stride_sb + (slot % BS) * stride_ss + head * stride_sh, mask=ok,
                        other=0.0)
        tl.store(out_ptr + r[:, None] * stride_on + head * stride_oh + d, (q * scale[:, None]).to(
            out_ptr.dtype.element_ty), mask=m)


BLOCK_ROWS = 16  # rows per program of the int8 kernels


def quantize_into_slots(x: Tensor, slot_mapping: Tensor, q_pool: Tensor, scale_pool: Tensor) -> None:
    """Triton version of `quantize_into_slots_ref` (the code pool contiguous; the scale pool of any strides)."""
    n, heads, d = x.shape
    x = x.contiguous()
    if n:
        _quantize_kernel[(triton.cdiv(n, BLOCK_ROWS), heads)](
            x, slot_mapping.contiguous(), q_pool, scale_pool, n, x.stride(0), x.stride(1), *scale_pool.stride(),
            D=d, D_PAD=triton.next_power_of_2(d), H=heads, BS=scale_pool.shape[1], BLOCK_R=BLOCK_ROWS)


def dequantize_slots(q_pool: Tensor, scale_pool: Tensor, slot_mapping: Tensor, dtype: torch.dtype) -> Tensor:
    """Triton version of `dequantize_slots_ref`."""
    heads, d = q_pool.shape[2], q_pool.shape[3]
    n = slot_mapping.shape[0]
    out = torch.empty(n, heads, d, dtype=dtype, device=q_pool.device)
    if n:
        _dequantize_kernel[(triton.cdiv(n, BLOCK_ROWS), heads)](
            q_pool, scale_pool, slot_mapping.contiguous(), out, n, out.stride(0), out.stride(1), *scale_pool.stride(),
            D=d, D_PAD=triton.next_power_of_2(d), H=heads, BS=scale_pool.shape[1], BLOCK_R=BLOCK_ROWS)
    return out
