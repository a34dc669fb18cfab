"""SnapKV in the paged serving cache: the last `window` queries vote for the tokens to keep.

The evaluator's SnapKV (`zeroc.policies.snapkv`) is streaming: there is no prompt boundary, so
each time the budget forces an eviction, the observation window (the last `window` queries of
the sequence, the new one included) attends over the kept keys, the votes are max-pooled along
the sequence, and the least-voted token outside the window goes. Serving runs that rule
unchanged through the generic eviction store (`eviction.py`): a prompt is taken token by token,
so a prompt's kept tokens are chosen by the pooled attention of its own last observation window
at every step, and generated tokens are handled the same way.

Beyond H2O's state (kept K/V, positions, scores per slot) a sequence needs its last `window`
queries per layer: they live in a ring of `ceil(window * group / block_size)` blocks the
sequence borrows from the cache's allocator when it starts and returns when it is freed (query
of position p, query head g of KV head h: row (p % window) * group + g of the ring, [kv_heads,
k_dim] per row in the layer's K pool; their positions are the last `window` ones, so none are
stored). The block arithmetic thus counts the queries' real bytes.

Disaggregated serving is not supported (`transferable = False`, `load` raises): the decode side
would need the prompt's queries, which the K/V wire does not carry, and the prefill service's
kept set is not sent either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from zeroc.policies.base import LayerGeometry
from zeroc.policies.eviction import EvictionCache
from zeroc.policies.snapkv import SnapKV
from zeroc.serving_policies.base import ceil_div
from zeroc.serving_policies.eviction import EvictionServing, EvictionStore

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape
    from zeroc.model import Transformer


@dataclass(frozen=True)
class SnapKVServing(EvictionServing):
    """After t tokens a sequence keeps min(t, max(floor(budget * t), 1)) tokens per layer and KV head:
    the latest min(window, kept) and those the window's pooled attention ranks highest."""

    budget: float = 1.0  # fraction of the tokens seen (the evaluator's `--kv-budget`)
    window: int = 32  # observation window: recent queries that vote, and recent tokens always kept
    kernel: int = 7  # max-pooling width (odd)

    def __post_init__(self) -> None:
        _ = self.rule  # the evaluator's SnapKV validates budget, window and kernel (ValueError)

    @property
    def rule(self) -> SnapKV:
        return SnapKV(budget=self.budget, window=self.window, kernel=self.kernel)

    @property
    def label(self) -> str:
        return f"snapkv-b{self.budget:g}-w{self.window}-k{self.kernel}"

    def new_store(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> SnapKVStore:
        return SnapKVStore(self, shapes, num_blocks, block_size, dtype, device, allocator)


class SnapKVStore(EvictionStore):
    def __init__(self, policy: SnapKVServing, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, allocator: BlockAllocator):
        super().__init__(policy, shapes, num_blocks, block_size, dtype, device)
        self.window, self.allocator = policy.window, allocator
        self.group = 0  # query heads per KV head, known once `prepare` has seen the model
        self.rings: dict[int, list[int]] = {}  # a sequence's first block -> its query ring's blocks

    def prepare(self, model: Transformer) -> None:
        cfg = model.config
        if any(cfg.per_head_ranks(i) for i in range(cfg.num_hidden_layers)):  # its ring is laid out per KV head
            raise ValueError("--kv-policy snapkv keeps its query window in the K pool by KV head, and this model's "
                             "layers cache one row of every head's dims (per-KV-head ranks); serve it without snapkv")
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads

    @property
    def ring_blocks(self) -> int:
        if not self.group:
            raise RuntimeError("a snapkv cache needs its model's head counts: build PagedKVCache(..., model=...)")
        return ceil_div(self.window * self.group, self.bs)

    def borrow_needed(self, cur: int, new: int) -> int:
        return self.ring_blocks if cur == 0 < new else 0

    def reserve(self, table: list[int], cur: int, new: int) -> None:
        if cur == 0 < new:
            self.rings[table[0]] = self.allocator.allocate(self.ring_blocks)

    def release(self, table: list[int]) -> None:
        if table and table[0] in self.rings:
            self.allocator.free(self.rings.pop(table[0]))

    def _ring_rows(self, table: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Flat K-pool rows of the queries of `positions` ([m]) -> [m, group]."""
        ring = torch.tensor(self.rings[table[0]], dtype=torch.long)
        rows = (positions % self.window)[:, None] * self.group + torch.arange(self.group)[None, :]
        return ring[rows // self.bs] * self.bs + rows % self.bs

    def _gather(self, layer: int, geom: LayerGeometry, table: list[int], cur: int) -> EvictionCache:
        cache = super()._gather(layer, geom, table, cur)
        pos = torch.arange(max(0, cur - self.window), cur)
        flat = self.k[layer].view(-1, *self.k[layer].shape[2:])  # [slots, kv_heads, k_dim]
        rows = flat[self._ring_rows(table, pos)]  # [m, group, kv_heads, k_dim]
        cache.state.queries = rows.permute(2, 1, 0, 3).reshape(1, geom.heads, len(pos), geom.k_dim)  # heads kv-major
        cache.state.query_pos = pos
        return cache

    def _scatter(self, layer: int, table: list[int], cache: EvictionCache) -> None:
        super()._scatter(layer, table, cache)
        st = cache.state
        q = st.queries[0]  # [heads, m, k_dim]
        rows = q.view(-1, self.group, *q.shape[1:]).permute(2, 1, 0, 3)  # [m, group, kv_heads, k_dim]
        flat = self.k[layer].view(-1, *self.k[layer].shape[2:])
        flat[self._ring_rows(table, st.query_pos)] = rows.to(flat.dtype)
