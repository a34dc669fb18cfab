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

    @triton.jit
    def paged_walk_start(tables_ptr, seq, stride_tb, k_ptr, v_ptr, kv_head, stride_kh, stride_vh,
                         ROWS: tl.constexpr, DV_PAD: tl.constexpr):
        # The state a walk over one sequence's pages starts from, for ROWS query rows of one KV head: the
        # online softmax's running max m and sum l, the output accumulator [ROWS, DV_PAD], the sequence's
        # block-table row, and the head's K and V bases.
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DV_PAD], tl.float32)
        table = tables_ptr + seq.to(tl.int64) * stride_tb
        return m_i, l_i, acc, table, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh
else:
    load_rows = paged_walk_start = None  # the kernels that call them are defined only where triton imports
