"""How one forward attends: the object `Attention` hands its q, k, v to, chosen by the forward, not by the layer.

Every layer calls the same methods whatever the forward is; which implementation runs is decided once per
forward by `Transformer` (dense causal, paged through a cache, fused epilogue, or a caller's function):
- `__call__(layer, q, k, v, scale)`: a uniform layer's q, k after RoPE (and rotate mode's bases);
- `raw(layer, attn, q, k, v, positions)`: the same before RoPE, where `fuses_rope` holds (the epilogue
  kernel applies RoPE and writes K/V);
- `runs(layer, layout, qs, ks, vs, scale)`: a layer whose KV heads keep different ranks (zeroc/head_ranks.py),
  one q, k, v per run of equal-rank heads;
- `tiered(...)` / `tiered_runs(...)`: a layer with a full-rank token tier (zeroc/tier.py).
To add a way of attending, subclass `Attend` and override what differs; the defaults treat a per-head layer
as one KV head of the cache row's width (exact: each query is zero outside its own head's dims).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc.head_ranks import HeadLayout
from zeroc.kv_cache import PagedBatch, PagedKVCache
from zeroc.tier import TierLayer, tiered_attention, tiered_chunk_attention
from zeroc_kernels.attention import AttentionBackend
from zeroc_kernels.sdpa import sdpa_lse

if TYPE_CHECKING:  # only for annotations: the model module builds these objects
    from zeroc.model import Attention

# attend(layer, q, k, v, scale) -> out; q: [..., heads, dq], k: [..., kv_heads, dq], v: [..., kv_heads, dv]
AttendFn = Callable[[int, Tensor, Tensor, Tensor, float], Tensor]
QKV = tuple[Tensor, Tensor, Tensor]
RunsQKV = tuple[list[Tensor], list[Tensor], list[Tensor]]


def causal_attend(_layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Dense causal attention over whole sequences (an AttendFn).

    q: [B, T, heads, dq]; k: [B, T, kv_heads, dq]; v: [B, T, kv_heads, dv] -> [B, T, heads, dv]
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


class Attend:
    """The base: a uniform layer through `__call__`; per-head layers as one wide KV head; no token tier."""

    fuses_rope = False

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        raise NotImplementedError

    def raw(self, layer: int, attn: Attention, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes q and k after RoPE")

    def runs(self, layer: int, layout: HeadLayout, qs: list[Tensor], ks: list[Tensor], vs: list[Tensor],
             scale: float) -> list[Tensor]:
        """Per run q [*P, n * group, w], k [*P, n, w], v [*P, n, v] -> per run [*P, n * group, v]."""
        out = self(layer, layout.queries(qs), layout.rows(ks), layout.rows(vs), scale)
        return layout.outputs(out, [v.shape[-1] for v in vs])

    def tiered(self, layer: int, comp: QKV, full: QKV, tier: tuple[int, int], scale: float) -> Tensor:
        """comp: q, k, v at the compressed widths; full: [compressed | tier] dims; tier: (sinks, recent)."""
        raise ValueError("this model keeps a full-rank token tier: it runs the dense forward and the paged "
                         "cache (generate, serve, streaming eval), not KV-cache policies")

    def tiered_runs(self, layer: int, layout: HeadLayout, comp: RunsQKV, tier_dims: RunsQKV, tier: tuple[int, int],
                    scale: float) -> tuple[list[Tensor], list[Tensor]]:
        """Per run: comp (q, k, v) compressed, tier_dims (q, k, v) the tier's dims -> per run the outputs'
        compressed dims and tier dims."""
        return self.tiered(layer, None, None, tier, scale)  # raises, as `tiered`


class DenseCausal(Attend):
    """Whole sequences, causally, no cache: training and the full-pass evaluation. [B, T, ...] tensors."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        return causal_attend(layer, q, k, v, scale)

    def runs(self, layer, layout, qs, ks, vs, scale):
        # each run at its own widths: exact FLOPs
        return [causal_attend(layer, q, k, v, scale) for q, k, v in zip(qs, ks, vs)]

    def tiered(self, layer, comp, full, tier, scale):
        # -> [B, T, heads, d]. With gradients (training, distillation): the reference, [T, T] scores per head.
        # Without (evaluation): each sequence by segments, torch's flash kernel over the compressed one and local
        # attention over the full-rank one, as a paged prompt runs: at 4,096 tokens and 32 heads the reference's
        # scores alone take 2 GiB a sequence.
        if torch.is_grad_enabled():
            return tiered_attention(*comp, *full, *tier, scale)
        (q, k, v), (_, k_c, v_c) = full, comp
        dims = TierLayer(k_c.shape[-1], v_c.shape[-1], k.shape[-1] - k_c.shape[-1], v.shape[-1] - v_c.shape[-1])
        return torch.stack([tiered_chunk_attention(q[b], k[b], v[b], dims, *tier, scale, sdpa_lse)
                            for b in range(q.shape[0])])

    def tiered_runs(self, layer, layout, comp, tier_dims, tier, scale):
        kept, rest = [], []
        for qc, kc, v, qt, kt, vt in zip(*comp, *tier_dims):
            out = self.tiered(layer, (qc, kc, v), _cat((qc, kc, v), (qt, kt, vt)), tier, scale)  # [B, T, n*g, d]
            kept.append(out[..., : v.shape[-1]])
            rest.append(out[..., v.shape[-1]:])
        return kept, rest


def _cat1(x: Tensor, y: Tensor) -> Tensor:
    return torch.cat([x, y], -1)


def _cat(a: QKV, b: QKV) -> list[Tensor]:
    """(q, k, v) and their tier dims -> the full-rank q, k, v (compressed dims first)."""
    return [_cat1(x, y) for x, y in zip(a, b)]


class CallerAttend(Attend):
    """A caller's AttendFn (KV-cache policies in evaluation, calibration, sequence parallelism)."""

    def __init__(self, fn: AttendFn):
        self.fn = fn

    def __call__(self, layer, q, k, v, scale):
        return self.fn(layer, q, k, v, scale)


class PagedAttend(Attend):
    """Through a paged cache: the step's K/V enter through the cache's KV-write seam (`write`, or a policy's
    pools stage them), then the backend attends each sequence's cached context. [N, ...] tensors."""

    def __init__(self, cache: PagedKVCache, batch: PagedBatch, backend: AttentionBackend):
        self.cache, self.batch, self.backend = cache, batch, backend

    @functools.cached_property
    def _fresh_slots(self) -> tuple[Tensor, Tensor]:
        """(block [N], offset in it [N]) of each new row: once per forward, not once per layer."""
        slots, bs = self.batch.slot_mapping, self.cache.block_size
        return slots // bs, slots % bs

    @functools.cached_property
    def _plan(self) -> object | None:
        """The backend's plan of this step (`AttentionBackend.plan`), for every layer's paged attention."""
        b, c = self.batch, self.cache
        return self.backend.plan(b.block_tables, b.seq_lens, b.query_start_loc, b.slot_mapping.shape[0],
                                 c.block_size, c.num_blocks, b.max_query_len)

    def _attend_pools(self, layer: int, q: Tensor, k_pool: Tensor, v_pool: Tensor, scale: float) -> Tensor:
        b = self.batch
        if b.fresh and self.backend.attends_fresh(b.max_query_len):
            # The rows as the cache holds them (whoever wrote them: PyTorch or the fused epilogue), read back by
            # slot: an [N, kv_heads, d] copy, small beside attention over a long prompt.
            blocks, offsets = self._fresh_slots
            return self.backend.fresh_prefill(q, k_pool[blocks, offsets], v_pool[blocks, offsets], b.query_lens,
                                              scale)
        return self.backend.paged_attention(q, k_pool, v_pool, b.block_tables, b.seq_lens, b.query_start_loc, scale,
                                            max_q=b.max_query_len, plan=self._plan)

    def __call__(self, layer, q, k, v, scale):
        # q: [N, heads, dq]; k: [N, kv_heads, dq]; v: [N, kv_heads, dv] -> [N, heads, dv]
        self.cache.write(layer, self.batch.slot_mapping, k, v)
        if self.cache.pools is not None:
            return self.cache.pools.attend(layer, q, self.batch, scale)
        return self._attend_pools(layer, q, *self.cache.layer(layer), scale)

    def runs(self, layer, layout, qs, ks, vs, scale):
        # The cache row holds every head's dims side by side; plain pools are read per run through strided views.
        if self.cache.pools is not None:
            return super().runs(layer, layout, qs, ks, vs, scale)
        self.cache.write(layer, self.batch.slot_mapping, layout.rows(ks), layout.rows(vs))
        k_pool, v_pool = self.cache.layer(layer)
        k_views = layout.pool_views(k_pool, [k.shape[-1] for k in ks])
        v_views = layout.pool_views(v_pool, [v.shape[-1] for v in vs])
        return [self._attend_pools(layer, q, kc, vc, scale) for q, kc, vc in zip(qs, k_views, v_views)]

    def tiered(self, layer, comp, full, tier, scale):
        # the tier pools reads the compressed dims first, the tier's after them (zeroc/policies/tier.py)
        return self(layer, *full, scale)

    def tiered_runs(self, layer, layout, comp, tier_dims, tier, scale):
        # one row of every head's compressed dims, then one of their tier dims
        (qc, kc, vc), (qt, kt, vt) = comp, tier_dims
        q_row = layout.queries(qc, qt)  # [N, heads, W_k + W_tier_k]
        out = self(layer, q_row, layout.rows(kc, kt), layout.rows(vc, vt), scale)
        v_width = sum(r.heads * r.v for r in layout.runs)
        return (layout.outputs(out, [v.shape[-1] for v in vc]),
                layout.outputs(out, [v.shape[-1] for v in vt], start=v_width))


class FusedPagedAttend(PagedAttend):
    """Through a plain paged cache whose QKV epilogue is one backend kernel per layer: RoPE on q and k (kept
    pairs in fold mode; every pair, then the KV head's bases in rotate mode), K and V written straight into
    their slots, then the backend's attention. The kernel wrote the rows, so the cache's `wrote` tells the
    KV-write seam's listeners. Per-head layers take the unfused path (`runs`): the epilogue writes whole heads."""

    fuses_rope = True

    def raw(self, layer, attn, q, k, v, positions):
        # q: [N, heads, w]; k: [N, kv_heads, w] before RoPE (w = head_dim in rotate mode, else qk_dim);
        # v: [N, kv_heads, v_dim]; positions: [N] -> [N, heads, v_dim]
        k_pool, v_pool = self.cache.layer(layer)
        slots = self.batch.slot_mapping
        if attn.rotate:
            q = self.backend.qkv_rotate_epilogue(q, k, v, positions, attn.inv_freq, attn.q_basis, attn.k_basis,
                                                 slots, k_pool, v_pool)
        else:  # one frequency row per KV head, or one row all share (an uncompressed layer's)
            q = self.backend.qkv_epilogue(q, k, v, positions, attn.inv_freq, slots, k_pool, v_pool)
        self.cache.wrote(layer, slots)
        return self._attend_pools(layer, q, k_pool, v_pool, attn.scale)
