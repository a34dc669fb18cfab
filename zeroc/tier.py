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
Only the dense forward runs a tier; the paged runtime refuses it (`require_no_tier`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.paged_decode import merge_partials_ref
from zeroc.config import ModelConfig


def require_no_tier(cfg: ModelConfig) -> None:
    """Raise ValueError if `cfg` keeps a full-rank token tier: only the dense forward runs it so far."""
    if cfg.has_tier:
        comp = cfg.compression
        raise ValueError(f"this model keeps a full-rank token tier (sinks {comp.sinks}, recent {comp.recent}), which "
                         "is evaluation-only for now: the paged cache and serving do not run it (use the full-pass "
                         "`zeroc eval ppl`, or calibrate without --sinks/--recent to serve)")


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

    q: [B, T, heads, dq]; k: [B, T, kv_heads, dq]; v: [B, T, kv_heads, dv]; mask: [T, T]
    -> (out [B, T, heads, dv], lse [B, T, heads]); a query with no allowed key gets out 0, lse -inf
    (no weight in the merge).
    """
    group = q.shape[-2] // k.shape[-2]
    k, v = k.repeat_interleave(group, -2), v.repeat_interleave(group, -2)  # [B, T, heads, d]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, heads, T, T]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, heads, T]
    probs = torch.exp(scores - lse.masked_fill(lse.isinf(), 0.0)[..., None])  # empty rows: all 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(v.dtype), lse.transpose(1, 2)


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
    d, layers = cfg.head_dim, range(cfg.num_hidden_layers)
    compressed = sum(cfg.qk_dim(i) + cfg.v_dim(i) for i in layers) / (2 * d * len(layers))
    if not cfg.has_tier:
        return compressed
    tier_tokens = min(cfg.compression.sinks + cfg.compression.recent, context)
    return compressed + tier_tokens / context * (1.0 - compressed)
