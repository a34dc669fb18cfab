"""Structured output's token mask: set every token a guided row's bitmask excludes to the lowest finite score.

A step's guided rows arrive as one int32 tensor `packed` [r * words + r]: r bitmasks of `words` int32s each (bit j
of word w allows token 32 w + j, as xgrammar fills them), then the row of `scores` each belongs to (zeroc/structured.py
builds it, one host-to-device copy). The mask is applied in place; the caller copies scores the log-probabilities
still read. The lowest finite value, not -inf: its weight exp(lowest - max) is 0 all the same, and the samplers read
a non-finite score as a broken row (zeroc.sampling `sample_batch`).

- `apply_token_bitmask_ref`: torch ops on any device (the torch backend's). It unpacks the bits to a [r, V] 1/0
  tensor: some eight passes over it, 1.4 ms at 32 rows of 8,192 tokens on a 2-core EPYC, 43 ms at 64 x 128,256.
- `apply_token_bitmask`: one Triton kernel (the triton backend's; on the CPU in the interpreter): a program per
  guided row and tile of tokens reads the tile's words and writes only the excluded tokens.
- The cpu backend's C++ build is csrc/sampling.cpp `apply_token_bitmask`, the same contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK_V = 1024  # tokens a program covers: 32 words, a 4 KiB tile of fp32 scores


def _split(packed: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """packed [r * words + r] -> (bitmasks [r, words], rows [r])."""
    n = packed.shape[0] - r
    if r < 1 or n < 0 or n % r:
        raise ValueError(f"token bitmask: {packed.shape[0]} int32s do not hold {r} rows' bitmasks and indices")
    return packed[:n].view(r, n // r), packed[n:]


def apply_token_bitmask_ref(scores: Tensor, packed: Tensor, r: int) -> None:
    """scores [B, V], changed in place; packed [r * words + r] int32 on scores' device (words >= V / 32)."""
    words, rows = _split(packed, r)
    rows = rows.long()
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)  # made there: a pageable copy would sync
    keep = ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : scores.shape[1]].to(scores.dtype)  # [r, V] 1/0
    # score * 1 + 0 where allowed, score * 0 + lowest where not: arithmetic, which the CPU runs 1.5x faster than
    # masked_fill or where (a non-finite score turns its row NaN, and the row fails, as a broken one should)
    masked = scores.index_select(0, rows).mul_(keep).add_(keep.sub_(1).mul_(-torch.finfo(scores.dtype).min))
    scores.index_copy_(0, rows, masked)


def apply_token_bitmask(scores: Tensor, packed: Tensor, r: int) -> None:
    """apply_token_bitmask_ref by one Triton kernel: scores [B, V] (unit stride along V), in place."""
    words, _ = _split(packed, r)
    vocab = scores.shape[1]
    if words.shape[1] * 32 < vocab or scores.stride(1) != 1:
        raise ValueError(f"token bitmask: {words.shape[1]} words a row cannot cover {vocab} tokens, "
                         "or the scores are not contiguous along the vocabulary")
    grid = (r, triton.cdiv(vocab, BLOCK_V))
    # the dtype's own lowest, passed as fp32 (exact for fp32, bf16 and fp16): fp32's would round to -inf in bf16
    _token_bitmask_kernel[grid](scores, packed, scores.stride(0), vocab, words.shape[1], r,
                                torch.finfo(scores.dtype).min, BLOCK_V=BLOCK_V)


if triton is not None:

    @triton.jit
    def _token_bitmask_kernel(scores_ptr, packed_ptr, stride_row, vocab, words, r, lowest, BLOCK_V: tl.constexpr):
        # Program: guided row i, tokens [BLOCK_V * j, BLOCK_V * (j + 1)).
        i = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] token ids
        inside = t < vocab
        # a word per 32 lanes (the loads coalesce to BLOCK_V / 32 distinct words); past the vocabulary, all allowed
        word = tl.load(packed_ptr + i * words + t // 32, mask=inside, other=-1)
        excluded = ((word >> (t % 32)) & 1) == 0
        row = tl.load(packed_ptr + r * words + i).to(tl.int64)
        value = tl.zeros([BLOCK_V], dtype=tl.float32) + lowest
        tl.store(scores_ptr + row * stride_row + t, value.to(scores_ptr.dtype.element_ty), mask=inside & excluded)
