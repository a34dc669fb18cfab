"""Triton helpers shared by the paged attention kernels."""

from __future__ import annotations

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def load_rows(base, rows, d, D: tl.constexpr, D_PAD: tl.constexpr, valid, MASKED: tl.constexpr):
        # rows: [N] element offsets of each token's row, d: arange(D_PAD) -> [N, D_PAD], zero past D and,
        # if MASKED, on rows where `valid` is false. The column mask is left out when D is a power of two,
        # so the compiler sees whole rows and issues 16-byte loads.
        ptrs = base + rows[:, None] + d[None, :]
        if MASKED:
            if D == D_PAD:
                return tl.load(ptrs, mask=valid[:, None], other=0.0)
            else:
                return tl.load(ptrs, mask=valid[:, None] & (d[None, :] < D), other=0.0)
        else:
            if D == D_PAD:
                return tl.load(ptrs)
            else:
                return tl.load(ptrs, mask=d[None, :] < D, other=0.0)
else:
    load_rows = None  # the kernels that call it are defined only where triton imports
