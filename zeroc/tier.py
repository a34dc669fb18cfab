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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc_kernels.paged_attention import segment_attention
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


CausalLSE = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def fresh_tiered_attention(q: Tensor, k: Tensor, v: Tensor, dims: TierLayer, sinks: int, recent: int, scale: float,
                           causal: CausalLSE) -> Tensor:
    """`tiered_attention` of one sequence over its own rows from position 0 (a prompt with nothing cached),
    without its [T, T] masks and scores, as the two segments' own shapes allow:
    - compressed: query t sees keys [S, t - W]. Queries [S + W, T) over keys [S, T - W) are equally many, so
      that is plain causal attention of the one over the other, which `causal` (a backend's
      `fresh_partials`: a fused flash kernel) runs at the compressed widths;
    - full rank: the sinks and the last W keys of each query, local attention (`_window_attention`).
    Merged by their log-sum-exps. q: [T, heads, k_dim + tier_k]; k: [T, kv, k_dim + tier_k];
    v: [T, kv, v_dim + tier_v] (compressed dims first, as the tier's pools take them) -> [T, heads, v_dim + tier_v]
    """
    t, heads, width = q.shape[0], q.shape[1], v.shape[-1]
    out_c = q.new_zeros(t, heads, width, dtype=torch.float32)  # compressed values: no tier dims
    lse_c = q.new_full((t, heads), float("-inf"), dtype=torch.float32)  # queries before S + W: no such keys
    start = sinks + recent
    if t > start:
        out, lse = causal(q[start:, :, : dims.k_dim], k[sinks: t - recent, :, : dims.k_dim],
                          v[sinks: t - recent, :, : dims.v_dim], scale)  # [T - S - W, heads, v_dim], [.., heads]
        out_c[start:, :, : dims.v_dim], lse_c[start:] = out, lse
    out_f, lse_f = _window_attention(q, k, v, sinks, recent, scale)  # each query sees itself or a sink: lse finite
    outs = torch.stack([out_f, out_c], dim=2)  # [T, heads, 2, width]
    return merge_partials_ref(outs, torch.stack([lse_f, lse_c], dim=-1))[0].to(q.dtype)


def _window_attention(q: Tensor, k: Tensor, v: Tensor, sinks: int, recent: int, scale: float,
                      block: int = 32) -> tuple[Tensor, Tensor]:
    """Each query t over keys j <= t with j < S or j > t - W, at full rank, in blocks of C queries: a block
    [b0, b0 + C) needs the sinks and keys (b0 - W, b0 + C), so its scores are [C, S + C + W - 1], not [C, T].
    Smaller blocks score fewer keys per query and gather more rows; C = max(32, W / 2) measured best on the CPU.
    q: [T, heads, d]; k: [T, kv, d]; v: [T, kv, dv] -> (out [T, heads, dv], lse [T, heads] fp32)"""
    t, heads, d = q.shape
    kv, c = k.shape[1], max(block, recent // 2)
    n, group, device = -(-t // c), heads // k.shape[1], q.device
    q_pos = torch.arange(n * c, device=device).view(n, c)  # [n, C]
    window = torch.arange(c + recent - 1 if recent else 0, device=device)
    k_pos = torch.cat([torch.arange(sinks, device=device).expand(n, sinks),
                       q_pos[:, :1] - (recent - 1) + window], 1)  # [n, K = S + C + W - 1]
    is_sink = torch.arange(k_pos.shape[1], device=device) < sinks  # [K]
    seen = ((k_pos[:, None] <= q_pos[..., None]) & (k_pos[:, None] >= 0)
            & (is_sink | ((k_pos[:, None] >= sinks) & (k_pos[:, None] > q_pos[..., None] - recent))))  # [n, C, K]
    rows = k_pos.clamp(0, t - 1)
    qb = F.pad(q, (0, 0, 0, 0, 0, n * c - t)).view(n, c, kv, group, d).permute(0, 2, 3, 1, 4)  # [n, kv, g, C, d]
    kb = k[rows].permute(0, 2, 3, 1).float()  # [n, kv, d, K]
    scores = torch.matmul(qb.float().reshape(n, kv, group * c, d), kb).view(n, kv, group, c, -1)
    scores.mul_(scale).masked_fill_(~seen[:, None, None], float("-inf"))  # a real query sees >= 1 key
    lse = torch.logsumexp(scores, -1)  # [n, kv, g, C]
    probs = scores.sub_(lse[..., None]).exp_().view(n, kv, group * c, -1)  # in place: [n, kv, g * C, K]
    out = torch.matmul(probs, v[rows].transpose(1, 2).float()).view(n, kv, group, c, -1)  # [n, kv, g, C, dv]
    out = out.permute(0, 3, 1, 2, 4).reshape(n * c, heads, -1)[:t]
    return out, lse.permute(0, 3, 1, 2).reshape(n * c, heads)[:t]


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
