"""Token tier: attention sinks and a recent window kept at full rank beside the compressed cache.

With a tier (`AttentionCompression.sinks` S, `.recent` W), query i attends to
- the full-rank segment: keys j <= i with j < S (sinks) or j > i - W (its last W tokens, itself
  included), scored with full q·k and read with full values through the full W_o;
- the compressed segment: every other earlier key (S <= j <= i - W), through the folded weights.
Each segment is a softmax on its own (an output and a log-sum-exp per query head), merged by
`kernels.paged_decode.merge_partials_ref`: exactly one softmax over both segments' scores.

Full-rank q, k, v are the compressed ones with their complement appended (`Attention` in
zeroc/model.py builds them), so the compressed segment's outputs are the full-rank ones with
zeros in the complement dims, and one output projection [W_o B_r | W_o B_c] serves both.
The paged runtime runs the same two segments through `zeroc.policies.tier.TierPools`: the compressed
rows of every token in the cache's blocks, the tier's extra rows of each sequence's sinks and last
W tokens in blocks it borrows. KV-cache policies (`--kv-policy`) do not combine with a tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc_kernels.paged_decode import merge_partials_ref
from zeroc.config import ModelConfig


@dataclass(frozen=True)
class TierLayer:
    """What a tiered layer keeps per token and cached head besides its compressed K/V rows: full-rank q.k is the
    compressed dims' score plus the tier dims' (fold: the dropped RoPE pairs; rotate: the bases' complement
    columns), and the full-rank value is the compressed one with the V complement appended. (A layer with
    per-KV-head ranks caches one row of all its KV heads' dims: `ModelConfig.kv_geometry`.)"""

    k_dim: int  # compressed key width (in the cache's blocks)
    v_dim: int  # compressed value width
    tier_k: int  # extra key (and query) dims of a tier token: head_dim - k_dim (per-head row: kv * d - k_dim)
    tier_v: int  # extra value dims: head_dim - v_dim (per-head row: kv * d - v_dim)


def tier_layers(cfg: ModelConfig) -> list[TierLayer]:
    """Every layer's tier widths (a model with a tier)."""
    return [TierLayer(*cfg.kv_geometry(i)[1:], *cfg.tier_geometry(i)) for i in range(cfg.num_hidden_layers)]


def tier_positions(sinks: int, recent: int, length: int) -> list[range]:
    """Positions whose full-rank rows a sequence of `length` tokens keeps for its next query: the sinks
    and its last `recent` tokens after them, as at most two ascending, disjoint ranges."""
    head = range(min(sinks, length))
    tail = range(max(sinks, length - recent) if recent else length, length)
    if tail and head and tail.start <= head.stop:
        return [range(0, length)]
    return [r for r in (head, tail) if r]


def tier_masks(length: int, sinks: int, recent: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Causal key masks of the two segments for `length` tokens -> (full_rank [T, T], compressed [T, T]) bool,
    [query i, key j]; together they are the causal mask, and they never overlap."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    causal = j <= i
    full = causal & ((j < sinks) | (j > i - recent))
    return full, causal & ~full


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


def tiered_attention(q: Tensor, k: Tensor, v: Tensor, q_full: Tensor, k_full: Tensor, v_full: Tensor,
                     sinks: int, recent: int, scale: float) -> Tensor:
    """Dense causal attention with the token tier.

    q: [B, T, heads, dq]; k: [B, T, kv, dq]; v: [B, T, kv, dv] compressed;
    q_full: [B, T, heads, d]; k_full: [B, T, kv, d]; v_full: [B, T, kv, D] full rank, whose first dv
    dims are `v`'s -> [B, T, heads, D]
    """
    full_mask, compressed_mask = tier_masks(q.shape[1], sinks, recent, q.device)  # [T, T] each
    out_full, lse_full = segment_attention(q_full, k_full, v_full, full_mask, scale)
    out_comp, lse_comp = segment_attention(q, k, v, compressed_mask, scale)
    out_comp = F.pad(out_comp, (0, v_full.shape[-1] - v.shape[-1]))  # compressed values: no complement dims
    outs = torch.stack([out_full, out_comp], dim=-2)  # [B, T, heads, 2, D]
    lses = torch.stack([lse_full, lse_comp], dim=-1)  # [B, T, heads, 2]
    return merge_partials_ref(outs, lses)[0]


def tier_kv_fraction(cfg: ModelConfig, context: int) -> float:
    """KV bytes at `context` tokens as a fraction of the uncompressed cache, the tier's rows included: its
    min(S + W, T) tokens cost the full-minus-compressed difference on top of the compressed cache."""
    layers = range(cfg.num_hidden_layers)
    full = 2 * cfg.head_dim * cfg.num_key_value_heads * len(layers)
    compressed = sum(h * (k + v) for h, k, v in map(cfg.kv_geometry, layers)) / full
    if not cfg.has_tier:
        return compressed
    tier_tokens = min(cfg.compression.sinks + cfg.compression.recent, context)
    return compressed + tier_tokens / context * (1.0 - compressed)  # a tier token costs a full-width row
