"""The token tier (zeroc/tier.py) in the paged serving cache.

Every token's compressed K/V rows live in the cache's blocks, as for any compressed model. A
sequence's tier — the extra rows (`TierLayer`) of its first `sinks` tokens and of its last `recent`
tokens — lives in blocks it borrows from the same allocator, so the engine's block arithmetic
counts its real bytes: position p < S in tier slot p, a later one in slot S + (p - S) % W (a ring,
overwritten as tokens age out of the window). Borrowed blocks are keyed by the sequence's first
block id and return when it is freed.

The model hands the store each layer's q, k, v with the tier's dims appended to the compressed
ones (`Attention._tiered`): q [N, heads, k_dim + tier_k], k [N, kv, k_dim + tier_k],
v [N, kv, v_dim + tier_v]. Attention is `tiered_attention`'s, query by query: the full-rank
segment over the sinks and the last W keys, the compressed segment over the rest, merged by
log-sum-exp. Over the wire a prompt's compressed rows travel as usual and its tier rows as
`KV_TENSOR_TIER_*` chunks (`wire_parts`); the decode side lands both and calls `load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.paged_decode import merge_partials_ref
from zeroc.serving_policies.base import PolicyStore, ServingKVPolicy, batch_sequences, ceil_div
from zeroc.config import ModelConfig
from zeroc.tier import TierLayer, segment_attention, tier_layers, tier_positions

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch


@dataclass(frozen=True)
class TierServing(ServingKVPolicy):
    """The cache policy of a model with a token tier; `PagedKVCache` picks it from the model, never a flag."""

    sinks: int
    recent: int
    layers: tuple[TierLayer, ...]

    @property
    def label(self) -> str:
        return f"tier-s{self.sinks}-w{self.recent}"

    def check(self, shapes: list[LayerShape], block_size: int) -> None:
        widths = [(s.k_dim, s.v_dim) for s in shapes]
        if shapes and widths != [(t.k_dim, t.v_dim) for t in self.layers]:
            raise ValueError(f"tier cache: layer widths {widths} are not the model's compressed ones")

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        from zeroc.kv_cache import block_bytes

        return block_bytes(shapes, block_size, dtype)

    def tier_blocks(self, shapes: list[LayerShape], block_size: int, tokens: int) -> int:
        """Blocks a sequence of `tokens` tokens borrows for its tier rows: in every layer they fill the
        same block ids' slot ranges, so the widest layer decides."""
        held = min(tokens, self.sinks + self.recent)
        return max(ceil_div(held * (t.tier_k + t.tier_v), block_size * (s.k_dim + s.v_dim))
                   for s, t in zip(shapes, self.layers))

    def new_store(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> TierStore:
        return TierStore(self, shapes, num_blocks, block_size, dtype, device, allocator)


def tier_policy(cfg: ModelConfig) -> TierServing:
    """The cache policy a model with a token tier needs (ValueError without one)."""
    if not cfg.has_tier:
        raise ValueError("this model keeps no token tier")
    return TierServing(cfg.compression.sinks, cfg.compression.recent, tuple(tier_layers(cfg)))


class TierStore(PolicyStore):
    def __init__(self, policy: TierServing, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, allocator: BlockAllocator):
        self.policy, self.shapes, self.bs, self.allocator = policy, shapes, block_size, allocator
        self.sinks, self.recent = policy.sinks, policy.recent
        # pools: [num_blocks, block_size, kv_heads, k_dim + v_dim] per layer; a borrowed block holds tier rows
        self.pools = [torch.zeros(num_blocks, block_size, s.kv_heads, s.k_dim + s.v_dim, dtype=dtype, device=device)
                      for s in shapes]
        self.borrowed: dict[int, list[int]] = {}  # a sequence's first block id -> its tier blocks
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    # -- block bookkeeping ----------------------------------------------------------------------
    def borrow_needed(self, cur: int, new: int) -> int:
        need = lambda t: self.policy.tier_blocks(self.shapes, self.bs, t)  # noqa: E731
        return need(new) - need(cur)

    def reserve(self, table: list[int], cur: int, new: int) -> None:
        ids = self.borrowed.setdefault(table[0], [])
        grow = self.policy.tier_blocks(self.shapes, self.bs, new) - len(ids)
        if grow > 0:
            ids.extend(self.allocator.allocate(grow))

    def release(self, table: list[int]) -> None:
        ids = self.borrowed.pop(table[0], None) if table else None
        if ids:
            self.allocator.free(ids)

    # -- tier rows ------------------------------------------------------------------------------
    def _slot(self, positions: Tensor) -> Tensor:
        # positions: [P] -> tier slots [P]; only positions the tier holds
        if not self.recent:
            return positions
        ring = self.sinks + (positions - self.sinks).remainder(self.recent)
        return torch.where(positions < self.sinks, positions, ring)

    def _read_tier(self, layer: int, table: list[int], held: int) -> Tensor:
        """The first `held` tier slots of a sequence -> [held, kv_heads, tier_k + tier_v] (a copy)."""
        s, t = self.shapes[layer], self.policy.layers[layer]
        ids = self.borrowed[table[0]]
        flat = self.pools[layer][ids].reshape(-1)[: held * s.kv_heads * (t.tier_k + t.tier_v)]
        return flat.view(held, s.kv_heads, t.tier_k + t.tier_v)

    def _write_tier(self, layer: int, table: list[int], length: int, positions: Tensor, rows: Tensor) -> None:
        # positions: [P] tier positions of a sequence of `length` tokens; rows: [P, kv_heads, tier_k + tier_v]
        if not positions.numel():
            return
        pool, ids = self.pools[layer], self.borrowed[table[0]]
        held = min(length, self.sinks + self.recent)
        tier = self._read_tier(layer, table, held)
        tier[self._slot(positions)] = rows.to(pool.dtype)
        flat = pool[ids].reshape(-1)
        flat[: tier.numel()] = tier.reshape(-1)
        pool[ids] = flat.view(len(ids), *pool.shape[1:])

    def _kept(self, cur: int, new: int) -> Tensor:
        """Positions of [cur, new) the tier keeps once the sequence has `new` tokens."""
        return torch.tensor([p for r in tier_positions(self.sinks, self.recent, new) for p in r if p >= cur],
                            dtype=torch.long, device=self.pools[0].device)

    # -- the model's calls ------------------------------------------------------------------------
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        # q: [N, heads, k_dim + tier_k] -> [N, heads, v_dim + tier_v]
        k_new, v_new = self._staged.pop(layer)
        t, pool = self.policy.layers[layer], self.pools[layer]
        rows = pool.view(-1, *pool.shape[2:])  # [slots, kv_heads, k_dim + v_dim]
        rows[batch.slot_mapping] = torch.cat([k_new[..., : t.k_dim], v_new[..., : t.v_dim]], -1).to(pool.dtype)
        out = q.new_empty(q.shape[0], q.shape[1], t.v_dim + t.tier_v)
        for cur, new, table, seq_rows in batch_sequences(batch):
            k_tier, v_tier = k_new[seq_rows, :, t.k_dim:], v_new[seq_rows, :, t.v_dim:]
            out[seq_rows] = self._attend_one(layer, q[seq_rows], k_tier, v_tier, table, cur, new, scale)
            kept = self._kept(cur, new)
            self._write_tier(layer, table, new, kept, torch.cat([k_tier, v_tier], -1)[kept - cur])
        return out

    def _attend_one(self, layer: int, q: Tensor, k_tier: Tensor, v_tier: Tensor, table: list[int], cur: int,
                    new: int, scale: float) -> Tensor:
        # q: [n, heads, k_dim + tier_k]; k_tier: [n, kv, tier_k]; v_tier: [n, kv, tier_v]; n = new - cur
        t, pool = self.policy.layers[layer], self.pools[layer]
        dev = q.device
        j = torch.arange(new, device=dev)
        stored = pool[table[: ceil_div(new, self.bs)]].flatten(0, 1)[:new]  # [new, kv, k_dim + v_dim]
        k_c, v_c = stored[..., : t.k_dim], stored[..., t.k_dim:]
        i = torch.arange(cur, new, device=dev)[:, None]  # [n, 1] query positions
        in_tier = lambda keys: (keys < self.sinks) | (keys > i - self.recent)  # noqa: E731 [n, keys]
        compressed = (j <= i) & ~in_tier(j)  # [n, new]
        out_c, lse_c = segment_attention(q[None, :, :, : t.k_dim], k_c[None], v_c[None], compressed, scale)
        # Full-rank keys: the sinks and every key some query of the chunk sees in its window, ascending;
        # those before the chunk come from the tier rows, the chunk's own from its staged rows.
        first_recent = max(self.sinks, cur - self.recent + 1) if self.recent else new
        p = torch.cat([j[: min(self.sinks, new)], j[first_recent:]])  # [P]
        old, own = p[p < cur], p[p >= cur] - cur
        extra = torch.cat([self._read_tier(layer, table, min(cur, self.sinks + self.recent))[self._slot(old)],
                           torch.cat([k_tier, v_tier], -1)[own].to(pool.dtype)])  # [P, kv, tier_k + tier_v]
        k_t, v_t = extra[..., : t.tier_k], extra[..., t.tier_k:]
        v_full = torch.cat([v_c[p], v_t], -1)
        if t.additive:
            q_full, k_full = q, torch.cat([k_c[p], k_t], -1)
        else:
            q_full, k_full = q[..., t.k_dim:], k_t
        full = (p[None, :] <= i) & in_tier(p[None, :])  # [n, P]
        out_f, lse_f = segment_attention(q_full[None], k_full[None], v_full[None], full, scale)
        outs = torch.stack([out_f[0], F.pad(out_c[0], (0, t.tier_v))], -2)  # [n, heads, 2, v_dim + tier_v]
        return merge_partials_ref(outs, torch.stack([lse_f[0], lse_c[0]], -1))[0]

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, kv, k_dim + tier_k]; v: [T, kv, v_dim + tier_v] of tokens [0, T), the tier dims valid
        # at the tier's positions only (`TierLanding`)
        t, pool, n = self.policy.layers[layer], self.pools[layer], k.shape[0]
        j = torch.arange(n, device=pool.device)
        blocks = torch.tensor(table[: ceil_div(n, self.bs)], dtype=torch.long, device=pool.device)
        rows = pool.view(-1, *pool.shape[2:])
        rows[blocks[j // self.bs] * self.bs + j % self.bs] = torch.cat([k[..., : t.k_dim], v[..., : t.v_dim]],
                                                                        -1).to(pool.dtype)
        kept = self._kept(0, n)
        self._write_tier(layer, table, n, kept, torch.cat([k[kept, :, t.k_dim:], v[kept, :, t.v_dim:]], -1))
