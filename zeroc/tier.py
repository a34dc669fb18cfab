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


DenseLSE = Callable[..., tuple[Tensor, Tensor]]  # AttentionBackend.dense_partials(q, k, v, scale, causal)


@dataclass(frozen=True)
class CachedRows:
    """What a prompt's chunk attends besides its own rows: the cached tokens' rows it needs, each in position
    order (zeroc/policies/tier.py reads them from the cache and the tier's blocks). All empty for a prompt with
    nothing cached (start 0)."""

    start: int  # position of the chunk's first row: the tokens cached before it
    k_comp: Tensor  # [start - S, kv, k_dim] compressed keys of positions [S, start) (empty if start <= S)
    v_comp: Tensor  # [start - S, kv, v_dim]
    k_sink: Tensor  # [min(S, start), kv, k_dim + tier_k] full-rank keys of the cached sinks
    v_sink: Tensor  # [min(S, start), kv, v_dim + tier_v]
    k_ring: Tensor  # [R, kv, k_dim + tier_k] full-rank keys of positions [start - R, start): the ring, R <= W
    v_ring: Tensor  # [R, kv, v_dim + tier_v]

    @classmethod
    def none(cls, k: Tensor, v: Tensor, dims: TierLayer) -> CachedRows:
        empty = lambda x, width: x.new_empty(0, x.shape[1], width)  # noqa: E731
        return cls(0, empty(k, dims.k_dim), empty(v, dims.v_dim), k[:0], v[:0], k[:0], v[:0])


def tiered_chunk_attention(q: Tensor, k: Tensor, v: Tensor, dims: TierLayer, sinks: int, recent: int, scale: float,
                           attend: DenseLSE, cached: CachedRows | None = None) -> Tensor:
    """`tiered_attention` for one sequence's chunk of new rows at positions [start, start + m) (start 0: a prompt
    with nothing cached), without [m, context] masks or scores, as the segments' shapes allow. Query t:
    - compressed keys [S, t - W]: the cached ones before start - W every query sees (attention over all of
      them), the rest [max(S, start - W), start + m - W) are as many as the queries from max(start, S + W) on,
      each seeing a prefix: plain causal attention. `attend` (a backend's `dense_partials`: a fused flash
      kernel) runs both at the compressed widths;
    - full-rank keys: the sinks and its last W tokens, local attention (`_window_attention`).
    The three partials merge by their log-sum-exps. q: [m, heads, k_dim + tier_k]; k: [m, kv, k_dim + tier_k];
    v: [m, kv, v_dim + tier_v] (compressed dims first, as the tier's pools take them) -> [m, heads, v_dim + tier_v]
    """
    c = cached or CachedRows.none(k, v, dims)
    m, heads, width, start = q.shape[0], q.shape[1], v.shape[-1], c.start
    parts = []  # (out, lse, first query) of each compressed part
    if start - recent > sinks:  # cached keys [S, start - W): every query's
        k_c, v_c = _compressed(c, k, v, dims, sinks, sinks, start - recent)
        parts.append((*attend(q[..., : dims.k_dim], k_c, v_c, scale, False), 0))
    first = max(start, sinks + recent)  # queries from here on see keys [max(start - W, S), t - W]: a prefix each
    if first < start + m:
        k_c, v_c = _compressed(c, k, v, dims, sinks, max(start - recent, sinks), start + m - recent)
        parts.append((*attend(q[first - start:, :, : dims.k_dim], k_c, v_c, scale, True), first - start))
    # positions [start - R, start + m) and [0, min(S, start + m)); a prompt with nothing cached uses its own rows
    k_win, v_win = (k, v) if not start else (torch.cat([c.k_ring, k]), torch.cat([c.v_ring, v]))
    k_sink, v_sink = (torch.cat([s, x[: max(0, sinks - start)]]) for s, x in ((c.k_sink, k), (c.v_sink, v)))
    out_f, lse_f = _window_attention(q, start, k_win, v_win, start - c.k_ring.shape[0], k_sink, v_sink, sinks,
                                     recent, scale)  # each query sees itself or a sink: lse finite
    outs = [out_f] + [q.new_zeros(m, heads, width, dtype=torch.float32) for _ in parts]  # compressed: no tier dims
    lses = [lse_f] + [q.new_full((m, heads), float("-inf"), dtype=torch.float32) for _ in parts]
    for i, (out, lse, at) in enumerate(parts, 1):
        outs[i][at:, :, : dims.v_dim], lses[i][at:] = out, lse
    return merge_partials_ref(torch.stack(outs, 2), torch.stack(lses, -1))[0].to(q.dtype)


def _compressed(c: CachedRows, k: Tensor, v: Tensor, dims: TierLayer, sinks: int, lo: int, hi: int
                ) -> tuple[Tensor, Tensor]:
    """Compressed keys and values of positions [lo, hi) (lo >= S): the cached ones, then the chunk's own."""
    start, clip = c.start, lambda x: max(x, 0)  # noqa: E731
    cached = slice(clip(lo - sinks), clip(min(hi, start) - sinks))
    own = slice(clip(lo - start), clip(hi - start))
    parts = [(c.k_comp[cached], c.v_comp[cached]), (k[own, :, : dims.k_dim], v[own, :, : dims.v_dim])]
    parts = [p for p in parts if p[0].shape[0]] or parts[:1]  # one part: a view, no copy (a prompt's own rows)
    return tuple(x[0] if len(x) == 1 else torch.cat(x) for x in zip(*parts))


def _window_attention(q: Tensor, q_start: int, k_win: Tensor, v_win: Tensor, win_start: int, k_sink: Tensor,
                      v_sink: Tensor, sinks: int, recent: int, scale: float, block: int = 32) -> tuple[Tensor, Tensor]:
    """Each query t (positions q_start + i) over keys j <= t with j < S or j > t - W, at full rank, in blocks of C
    queries: a block [b0, b0 + C) needs the sinks and keys (b0 - W, b0 + C), so its scores are [C, S + C + W - 1],
    not [C, context]. Smaller blocks score fewer keys per query and gather more rows; C = max(32, W / 2) measured
    best on the CPU. q: [m, heads, d]; k_win: [L, kv, d] and v_win: [L, kv, dv] keys at positions win_start + u
    (covering (q_start - W, q_start + m)); k_sink, v_sink: the sinks' [S', kv, *] (positions [0, S'))
    -> (out [m, heads, dv], lse [m, heads] fp32)"""
    m, heads, d = q.shape
    kv, c = k_win.shape[1], max(block, recent // 2)
    n, group, device = -(-m // c), heads // kv, q.device
    q_pos = q_start + torch.arange(n * c, device=device).view(n, c)  # [n, C]
    window = torch.arange(c + recent - 1 if recent else 0, device=device)
    sink_pos = torch.arange(k_sink.shape[0], device=device)
    k_pos = torch.cat([sink_pos.expand(n, -1), q_pos[:, :1] - (recent - 1) + window], 1)  # [n, K = S' + C + W - 1]
    is_sink = torch.arange(k_pos.shape[1], device=device) < k_sink.shape[0]  # [K]
    seen = ((k_pos[:, None] <= q_pos[..., None])  # [n, C, K]: a window key must lie in k_win and past t - W
            & (is_sink | ((k_pos[:, None] >= max(sinks, win_start)) & (k_pos[:, None] > q_pos[..., None] - recent))))
    win = (k_pos[:, k_sink.shape[0]:] - win_start).clamp(0, k_win.shape[0] - 1)  # [n, C + W - 1] rows in k_win
    kb = torch.cat([k_sink.expand(n, *k_sink.shape), k_win[win]], 1)  # [n, K, kv, d]
    vb = torch.cat([v_sink.expand(n, *v_sink.shape), v_win[win]], 1)  # [n, K, kv, dv]
    qb = F.pad(q, (0, 0, 0, 0, 0, n * c - m)).view(n, c, kv, group, d).permute(0, 2, 3, 1, 4)  # [n, kv, g, C, d]
    scores = torch.matmul(qb.float().reshape(n, kv, group * c, d), kb.permute(0, 2, 3, 1).float())
    scores = scores.view(n, kv, group, c, -1).mul_(scale).masked_fill_(~seen[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [n, kv, g, C]; a real query sees >= 1 key
    probs = scores.sub_(lse[..., None]).exp_().view(n, kv, group * c, -1)  # in place: [n, kv, g * C, K]
    out = torch.matmul(probs, vb.transpose(1, 2).float()).view(n, kv, group, c, -1)  # [n, kv, g, C, dv]
    out = out.permute(0, 3, 1, 2, 4).reshape(n * c, heads, -1)[:m]
    return out, lse.permute(0, 3, 1, 2).reshape(n * c, heads)[:m]


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
