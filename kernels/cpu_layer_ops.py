"""A layer's RMSNorm and RoPE on the CPU in one C++ call each (csrc/layer_ops.cpp, built into the ragged kernel's
module), beside their references: the `cpu` backend's `rms_norm`, `add_rms_norm` and `apply_rope`.

At a decode step's one row these ops are a few hundred elements, and eager PyTorch's cost is its ops' dispatch:
some 4 us each, nine for a residual add and its RMSNorm, six for RoPE from tables, 60-80 us a layer in all. The
kernel rounds where the references round (csrc/layer_ops.cpp), so RoPE gives their bits and RMSNorm all but the
last bit of the sum of squares' order. The kernel answers None for what it does not take (another dtype, mixed
dtypes or devices, shapes the reference would broadcast, or inputs that need gradients: it records no autograd
graph), and those go to the references. Checks are the kernel's: in Python they would cost what it saves.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from zeroc_kernels.layer_ops import add_rms_norm_ref, rms_norm_ref
from zeroc_kernels.qkv_epilogue import apply_rope_ref


def cpu_rms_norm(kernel: ModuleType, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [*, H]; weight: [H] -> RMSNorm(x) [*, H], as rms_norm_ref."""
    out = kernel.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps) if out is None else out


def cpu_add_rms_norm(kernel: ModuleType, x: Tensor, residual: Tensor, weight: Tensor, eps: float
                     ) -> tuple[Tensor, Tensor]:
    """x, residual: [*, H]; weight: [H] -> (RMSNorm(x + residual), x + residual), each [*, H], as add_rms_norm_ref."""
    out = kernel.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps) if out is None else out


def cpu_apply_rope(kernel: ModuleType, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [*P, heads, d]; cos, sin: [*P, heads or 1, d] -> RoPE(x) [*P, heads, d], as apply_rope_ref."""
    out = kernel.apply_rope(x, cos, sin)
    return apply_rope_ref(x, cos, sin) if out is None else out
