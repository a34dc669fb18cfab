"""Attention over a paged KV cache for a ragged batch (prefill, decode, or both in one step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc_kernels.kv_quant import dequantize_rows_ref


def paged_attention_ref(
    q: Tensor,  # [N, heads, d] new queries of all sequences, concatenated
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks] block ids per sequence
    seq_lens: Tensor,  # [B] context length per sequence, new tokens included
    query_start_loc: Tensor,  # [B + 1] offsets of each sequence's queries in N
    scale: float,
    max_q: int | None = None,  # the most queries of one sequence, when the caller knows it (saves a sync)
) -> Tensor:
    """Causal GQA attention of each sequence's new queries over its whole cached context.

    The new tokens' K/V must already be in the cache. A query at row i of sequence b sits at
    position seq_lens[b] - q_len[b] + i and sees keys at positions <= its own. -> [N, heads, dv]
    """
    num_seqs = block_tables.shape[0]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [B]
    if max_q is None:
        max_q = int(q_lens.max())
    ctx = block_tables.shape[1] * block_size

    # Pad queries to [B, max_q]: row j of sequence b is token query_start_loc[b] + j.
    row = torch.arange(max_q, device=q.device)
    valid_q = row[None, :] < q_lens[:, None]  # [B, max_q]
    src = (query_start_loc[:-1, None] + row[None, :]).clamp(max=q.shape[0] - 1)  # [B, max_q]
    q_pad = q[src]  # [B, max_q, heads, d]

    k = k_cache[block_tables].reshape(num_seqs, ctx, kv_heads, -1)  # [B, ctx, kv_heads, d]
    v = v_cache[block_tables].reshape(num_seqs, ctx, kv_heads, -1)  # [B, ctx, kv_heads, dv]

    q_pos = (seq_lens - q_lens)[:, None] + row[None, :]  # [B, max_q]
    k_pos = torch.arange(ctx, device=q.device)
    # Slots past a sequence's length hold stale data from earlier owners; zero them so that
    # even non-finite garbage cannot leak through masked (0-weight) positions.
    in_ctx = (k_pos[None, :] < seq_lens[:, None])[:, :, None, None]  # [B, ctx, 1, 1]
    k, v = torch.where(in_ctx, k, 0.0), torch.where(in_ctx, v, 0.0)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])

    dv = v.shape[-1]
    q_pad, k, v = one_width(q_pad, k, v)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True,
    ).transpose(1, 2)  # [B, max_q, heads, width]
    return out[valid_q][..., :dv]


def segment_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention over the keys `mask` allows, with its log-sum-exp.

    q: [B, Tq, heads, dq]; k: [B, Tk, kv_heads, dq]; v: [B, Tk, kv_heads, dv]; mask: [Tq, Tk] or [B, Tq, Tk]
    -> (out [B, Tq, heads, dv], lse [B, Tq, heads]); a query with no allowed key gets out 0, lse -inf
    (no weight in the merge).
    """
    b, tq, heads, _ = q.shape
    kv = k.shape[-2]
    qg = q.float().view(b, tq, kv, heads // kv, -1)  # each KV head's query group, no copies of k and v
    scores = torch.einsum("bqgjd,bkgd->bgjqk", qg, k.float()) * scale  # [B, kv, group, Tq, Tk]
    scores = scores.masked_fill(~(mask if mask.dim() == 2 else mask[:, None, None]), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, kv, group, Tq]
    probs = torch.exp(scores - lse.masked_fill(lse.isinf(), 0.0)[..., None])  # empty rows: all 0
    out = torch.einsum("bgjqk,bkgd->bqgjd", probs, v.float()).reshape(b, tq, heads, -1)
    return out.to(v.dtype), lse.reshape(b, heads, tq).transpose(1, 2)


def rows_contiguous(cache: Tensor) -> Tensor:
    """A cache pool as the kernels read it: every dim through its stride but the last, which must be dense.
    A column view of a pool (one run of a layer with per-KV-head ranks, zeroc/head_ranks.py) is read in
    place; copying it would copy the whole pool every step."""
    return cache if cache.stride(-1) == 1 else cache.contiguous()


def index_rows(t: Tensor) -> Tensor:
    """Block tables ([seqs, blocks]), lengths and query starts ([seqs(+1)]) as the kernels read them: in their own
    integer dtype, int32 or int64 (the kernels cast what they load), each row dense. The engine keeps them int64;
    converting them to int32 for every layer's launch was two kernels a layer, inside each decode CUDA graph."""
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block tables, lengths and query starts must be int32 or int64, got {t.dtype}")
    return t if t.stride(-1) == 1 else t.contiguous()


def scale_pools(k_scales: Tensor | None, v_scales: Tensor | None, q: Tensor
                ) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """int8 caches' scale pools ([num_blocks, block_size, kv_heads], any strides) as the kernels read them:
    -> (k_scales, v_scales, their (block, slot, head) strides), which the two share. The serving pools keep
    them head-major (zeroc/policies/int8.py), so one KV head's scales for a page are contiguous and a tile
    loads them in a few sectors; pools of other strides are copied to match only if the two differ.
    No scales (not int8): a one-element placeholder on q's device for pointers the kernel never reads."""
    if k_scales is None:  # empty, not zeros: a zeros would be a memset kernel in every layer of a CUDA graph
        unused = torch.empty(1, dtype=torch.float32, device=q.device)
        return unused, unused, (0, 0, 0)
    if k_scales.stride() != v_scales.stride():
        k_scales, v_scales = k_scales.contiguous(), v_scales.contiguous()
    return k_scales, v_scales, tuple(k_scales.stride())


def one_width(q: Tensor, k: Tensor, v: Tensor, multiple: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """q, k ([..., dq]) and v ([..., dv]) zero-padded to one width, a multiple of `multiple`, for SDPA, whose
    fused kernels need it (the CPU one falls back to a math path several times slower; ZeroC layers keep e.g. 48
    q/k and 16 v dims; torch's FlashAttention-2 op takes multiples of 8, which public SDPA pads to).
    Zero columns change nothing: they add 0 to q.k, and the caller cuts v's off the output ([..., :dv])."""
    dq, dv = q.shape[-1], v.shape[-1]
    width = -(-max(dq, dv) // multiple) * multiple
    if dq < width:
        q, k = F.pad(q, (0, width - dq)), F.pad(k, (0, width - dq))
    if dv < width:
        v = F.pad(v, (0, width - dv))
    return q, k, v


def check_int8_args(k_cache: Tensor, v_cache: Tensor, k_scales: Tensor | None, v_scales: Tensor | None) -> bool:
    """Whether the caches are int8 with per-token scales (both or neither); ValueError if mixed."""
    int8 = k_scales is not None
    if int8 != (v_scales is not None) or int8 != (k_cache.dtype == torch.int8 == v_cache.dtype):
        raise ValueError("int8 caches need both k_scales and v_scales, and scales need int8 caches")
    return int8


def paged_attention_int8_ref(
    q: Tensor,  # [N, heads, dq]
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq] int8
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv] int8
    k_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32, one per token and KV head
    v_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B]
    query_start_loc: Tensor,  # [B + 1]
    scale: float,
    max_q: int | None = None,
) -> Tensor:
    """-> [N, heads, dv]: dequantise the batch's blocks (as `kernels.kv_quant` wrote them), then the plain
    reference in fp32. Only the blocks the tables name: the CPU runtime serves int8 caches through this,
    and a whole pool would cost every step its size."""
    k, v, tables = dequantize_named_blocks(k_cache, v_cache, k_scales, v_scales, block_tables)
    return paged_attention_ref(q.float(), k, v, tables, seq_lens, query_start_loc, scale, max_q).to(q.dtype)


def dequantize_named_blocks(
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq] int8
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv] int8
    k_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    v_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    block_tables: Tensor,  # [B, max_blocks]
) -> tuple[Tensor, Tensor, Tensor]:
    """-> fp32 k [U, block_size, kv_heads, dq], v [U, ..., dv] of the U distinct blocks the tables name, and
    the tables renumbered into them ([B, max_blocks])."""
    ids, tables = block_tables.unique(return_inverse=True)  # each named block once; tables index into ids
    k = dequantize_rows_ref(k_cache[ids], k_scales[ids], torch.float32)
    v = dequantize_rows_ref(v_cache[ids], v_scales[ids], torch.float32)
    return k, v, tables
