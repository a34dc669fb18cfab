"""A decoder layer's elementwise ops, fused: RMSNorm in one pass, a residual add with the RMSNorm after it in
one pass, SwiGLU's silu(gate) * up in one pass.

At decode batch sizes these are tiny tensors ([64, 4096]), so their cost is the number of kernels, not
bytes: the eager RMSNorm is eight of them in bf16 (cast, pow, mean, add, rsqrt, mul, cast, mul), each residual
add one more and the gate two, twice and once per layer. `rms_norm`, `add_rms_norm` (vLLM's fused_add_rms_norm:
the model keeps the residual stream apart, so each add meets the norm that reads it) and `silu_mul` are one
Triton kernel each (GPU; the CPU interpreter under TRITON_INTERPRET=1 for tests); the `*_ref` functions are the
references and the torch path. The kernels round where the references do (Hugging Face's order), so a model
gives the same tokens either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc_kernels.tuning import interpreting

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_HIDDEN = 65536  # one program holds a whole row; Llama-3-405B's hidden is 16,384


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [*, H]; weight: [H] -> [*, H] in the promotion of the two dtypes.
    Normalise in fp32, round to x's dtype, then scale: Hugging Face's Llama order, so half precision matches."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual: [*, H] of one dtype; weight: [H] -> (RMSNorm(x + residual) [*, H], x + residual [*, H]): a
    residual add and the norm that reads its sum, exactly as the unfused layer computes them."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: [*, I] (the MLP's two projections) -> silu(gate) * up, [*, I]."""
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows, eps, stride_x, stride_o,
                         H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr):
        # Program: BLOCK_M whole rows (1 on a GPU from H = 1024 up; many in the interpreter, which pays per program).
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_H)
        ok = (r[:, None] < rows) & (c[None, :] < H)
        x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=ok, other=0.0)  # [M, H] in x's dtype
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=1) / H + eps)  # [M]
        y = (xf * inv[:, None]).to(x.dtype).to(tl.float32)  # rounded to x's dtype before the scale, as the ref
        w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * stride_o + c[None, :], (y * w[None, :]).to(out_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, rows, eps, stride_x, stride_r, stride_o,
                             stride_s, H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr):
        # As _rms_norm_kernel, on x + residual: the sum rounded to the inputs' dtype (as a torch add rounds it) is
        # stored for the next add and is what the norm reads.
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_H)
        ok = (r[:, None] < rows) & (c[None, :] < H)
        x = tl.load(x_ptr + r[:, None] * stride_x + c[None, :], mask=ok, other=0.0)  # [M, H] in x's dtype
        res = tl.load(r_ptr + r[:, None] * stride_r + c[None, :], mask=ok, other=0.0)
        h = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + r[:, None] * stride_s + c[None, :], h, mask=ok)
        hf = h.to(tl.float32)
        inv = tl.rsqrt(tl.sum(hf * hf, axis=1) / H + eps)  # [M]
        y = (hf * inv[:, None]).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * stride_o + c[None, :], (y * w[None, :]).to(out_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, rows, stride_g, stride_u, stride_o,
                         I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program: a [BLOCK_M, BLOCK_N] tile. Rows go by stride: gate and up may be the two halves of one GEMM's
        # output (zeroc/fused_linears.py), which a copy to make them dense would read and write again.
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (r[:, None] < rows) & (c[None, :] < I)
        g = tl.load(g_ptr + r[:, None] * stride_g + c[None, :], mask=ok, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # silu rounded to the dtype, as F.silu
        u = tl.load(u_ptr + r[:, None] * stride_u + c[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + r[:, None] * stride_o + c[None, :], (s * u).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: Tensor) -> Tensor:
    """x as [rows, H] with a dense last dim (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_out(x: Tensor, weight: Tensor, out: Tensor | None) -> Tensor:
    """Checks of a norm's row width, and its destination: `out` (of x's shape, the result dtype) or a new one."""
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"RMSNorm weight of shape {tuple(weight.shape)} for rows of width {h}")
    if h > MAX_HIDDEN:
        raise ValueError(f"rms_norm keeps a row in one program: width {h} is over {MAX_HIDDEN}")
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    if out.shape != x.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {dtype} tensor")
    return out


def _norm_launch(h: int) -> dict:
    """Rows per program and warps of a norm over rows of width h."""
    block_h = triton.next_power_of_2(h)
    # One row per program on a GPU once a row fills the warps; short rows share a program.
    block_m = 64 if interpreting() else max(1, min(64, 1024 // block_h))
    # decode runs a few dozen rows, one program each: wide programs finish a row sooner (sm90_compile.py: 16-byte loads)
    warps = 4 if block_h * block_m <= 2048 else 8 if block_h <= 16384 else 16
    return dict(H=h, BLOCK_H=block_h, BLOCK_M=block_m, num_warps=warps)


def rms_norm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """Triton version of `rms_norm_ref` (same arguments and shapes). out: optional destination of x's shape
    and the result dtype (tests poison it)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    out = _norm_out(x, weight, out)
    x2, o2 = _rows(x), out.view(-1, x.shape[-1])
    meta = _norm_launch(x.shape[-1])
    if x2.shape[0]:
        _rms_norm_kernel[(triton.cdiv(x2.shape[0], meta["BLOCK_M"]),)](
            x2, weight.contiguous(), o2, x2.shape[0], eps, x2.stride(0), o2.stride(0), **meta)
    return out


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Triton version of `add_rms_norm_ref` (same arguments and shapes): one kernel for the residual add and the
    norm after it. out: optional destination of the norm (tests poison it); the sum is a new tensor."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm needs x and residual of one shape and dtype, got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(residual.shape)} {residual.dtype}")
    out = _norm_out(x, weight, out)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = x.shape[-1]
    x2, r2, o2, s2 = _rows(x), _rows(residual), out.view(-1, h), total.view(-1, h)
    meta = _norm_launch(h)
    if x2.shape[0]:
        _add_rms_norm_kernel[(triton.cdiv(x2.shape[0], meta["BLOCK_M"]),)](
            x2, r2, weight.contiguous(), o2, s2, x2.shape[0], eps, x2.stride(0), r2.stride(0), o2.stride(0),
            s2.stride(0), **meta)
    return out, total


def silu_mul(gate: Tensor, up: Tensor, out: Tensor | None = None) -> Tensor:
    """Triton version of `silu_mul_ref` (same shapes; gate and up of one dtype, any row strides).
    out: optional contiguous destination (tests poison it)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul needs gate and up of one shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    elif out.shape != gate.shape or out.dtype != gate.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(gate.shape)} {gate.dtype} tensor")
    width = gate.shape[-1]
    g2, u2, o2 = _rows(gate), _rows(up), out.view(-1, width)
    rows = g2.shape[0]
    # The interpreter pays per program: whole rows, many at a time. A GPU: 1,024-element row pieces.
    block_n = triton.next_power_of_2(width) if interpreting() else min(1024, triton.next_power_of_2(width))
    block_m = max(1, min(64, (1 << 16) // block_n)) if interpreting() else 1
    if rows and width:
        _silu_mul_kernel[(triton.cdiv(rows, block_m), triton.cdiv(width, block_n))](
            g2, u2, o2, rows, g2.stride(0), u2.stride(0), o2.stride(0),
            I=width, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out
