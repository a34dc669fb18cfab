"""SnapKV (Li et al., 2024) in the paged cache: the last `window` queries vote for the tokens to keep.

SnapKV compresses a prompt once, after prefill. Here it is streaming: there is no prompt boundary,
so each time the budget forces an eviction, the observation window (the last `window` queries of
the sequence, the new one included) attends over the kept keys (causally), their attention is
summed over the window and the KV head's query group, max-pooled along the sequence (neighbours
of a strong token survive with it, as in the paper's clustering), and the least-voted token
outside the window goes. The generic eviction pools (`eviction.py`) runs it: a prompt is taken token by token,
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
import torch.nn.functional as F
from torch import Tensor

from zeroc.policies.base import ceil_div, check_budget
from zeroc.policies.eviction import EvictionMethod, EvictionPools
from zeroc.policies.eviction_rule import EvictionCache, EvictionState, LayerGeometry, protect_recent

if TYPE_CHECKING:
    from zeroc.config import ModelConfig
    from zeroc.kv_cache import BlockAllocator, LayerShape
    from zeroc.model import Transformer


@dataclass(frozen=True)
class SnapKV(EvictionMethod):
    """After t tokens a sequence keeps min(t, max(floor(budget * t), 1)) tokens per layer and KV head:
    the latest min(window, kept) and those the window's pooled attention ranks highest."""

    budget: float = 1.0  # fraction of the tokens seen (`--kv-budget`)
    window: int = 32  # observation window: recent queries that vote, and recent tokens always kept
    kernel: int = 7  # max-pooling width (odd)

    name = "snapkv"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"SnapKV window must be a positive int, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be a positive odd int, got {self.kernel!r}")

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.window

    @property
    def floor_tokens(self) -> int:
        return 1

    def borrowed_blocks(self, cfg: ModelConfig, shapes: list[LayerShape], block_size: int, tokens: int,
                        dtype: torch.dtype, step: int = 1) -> int:
        return ceil_div(self.window * (cfg.num_attention_heads // cfg.num_key_value_heads), block_size)

    def votes(self, state: EvictionState) -> Tensor:
        """Pooled attention of the window's queries to each live token -> [B, kv_heads, n] float64."""
        k, pos = state.live(state.k), state.live(state.pos)  # [B, kv, n, dq], [B, kv, n]
        b, kv, n, dq = k.shape
        w = state.queries.shape[2]
        q = state.queries.view(b, kv, -1, w, dq).float()  # [B, kv, group, w, dq]
        scores = torch.einsum("bkgwd,bknd->bkgwn", q, k.float()) * state.scale
        causal = pos[:, :, None, None, :] <= state.query_pos[None, None, None, :, None]  # [B, kv, 1, w, n]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        probs = probs.nan_to_num(0.0)  # a window query older than every kept token has no vote
        vote = probs.sum(dim=(2, 3))  # [B, kv, n]
        # Pool along the sequence: slots are not in position order, so sort, pool, and put back.
        order = pos.argsort(dim=-1)
        ranked = torch.gather(vote, 2, order).reshape(b * kv, 1, n)
        pooled = F.max_pool1d(ranked, self.kernel, stride=1, padding=self.kernel // 2).view(b, kv, n)
        return torch.zeros_like(pooled).scatter_(2, order, pooled).double()

    def priority(self, state: EvictionState, keep: int) -> Tensor:
        recent = protect_recent(state.live(state.pos), state.seen, min(self.window, keep))
        return recent + self.votes(state)

    @property
    def label(self) -> str:
        return f"snapkv-b{self.budget:g}-w{self.window}-k{self.kernel}"

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> SnapKVPools:
        return SnapKVPools(self, shapes, num_blocks, block_size, dtype, device, allocator)


class SnapKVPools(EvictionPools):
    def __init__(self, policy: SnapKV, shapes: list[LayerShape], num_blocks: int, block_size: int,
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
