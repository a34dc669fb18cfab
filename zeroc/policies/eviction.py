"""Token eviction (H2O, StreamingLLM, SnapKV) in the paged cache.

A sequence holds `rule.keep(t)` token slots after t tokens, per layer and KV head, in its own
blocks: slot j lives at offset j % block_size of its j // block_size-th block, and each
(layer, KV head) keeps its own tokens there with their positions and accumulated attention. The
count is the same for every layer and head, so the blocks a sequence needs follow from `keep`
alone and grow at the budget's rate, never to the full context: a prompt is taken token by
token (the rule, `zeroc.policies.eviction_rule.EvictionCache.step`, runs on the gathered slots), so
even a long prompt never holds more than its budget.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.policies.base import KVMethod, PolicyPools, ceil_div, eviction_keep, token_bits
from zeroc.policies.eviction_rule import EvictionCache, EvictionState, LayerGeometry

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch

POS_DTYPE, SCORE_DTYPE = torch.int32, torch.float64  # per slot, layer and KV head, beside K and V


class EvictionMethod(KVMethod):
    """A method that keeps, per sequence, layer and KV head, `keep(t)` of the t tokens seen at full
    precision, choosing the victims by `priority` (`zeroc.policies.eviction_rule`)."""

    places_by_position = False
    transferable = False  # the kept set depends on queries a K/V transfer does not carry
    query_window = 0  # how many recent queries the rule must remember
    budget: float

    @property
    @abc.abstractmethod
    def floor_tokens(self) -> int:
        """Minimum tokens kept (bounded by the tokens seen)."""

    def keep(self, seen: int) -> int:
        """Tokens a layer may hold once `seen` tokens have arrived (non-decreasing, by at most 1 a token)."""
        return eviction_keep(seen, self.budget, self.floor_tokens)

    @abc.abstractmethod
    def priority(self, state: EvictionState, keep: int) -> Tensor:
        """Rank the live tokens (the incoming one excluded); the lowest is evicted. -> [B, kv_heads, n] float64"""

    def slots_for(self, tokens: int) -> int:
        return self.keep(tokens) if tokens > 0 else 0

    def held_bits(self, shapes: list[LayerShape], tokens: int) -> float:
        return float(self.slots_for(tokens) * token_bits(shapes))

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        meta = torch.empty((), dtype=POS_DTYPE).element_size() + torch.empty((), dtype=SCORE_DTYPE).element_size()
        return block_size * sum(s.kv_heads * ((s.k_dim + s.v_dim) * item + meta) for s in shapes)

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> EvictionPools:
        return EvictionPools(self, shapes, num_blocks, block_size, dtype, device)


class EvictionPools(PolicyPools):
    def __init__(self, policy: EvictionMethod, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.policy, self.rule, self.shapes, self.bs, self.dtype = policy, policy, shapes, block_size, dtype

        def pool(width: int | None, s: LayerShape, dt: torch.dtype) -> Tensor:
            return torch.zeros(num_blocks, block_size, s.kv_heads, *([width] if width else []), dtype=dt,
                               device=device)

        # Per layer: k [num_blocks, block_size, kv_heads, k_dim], v likewise, pos and score [.., kv_heads]
        self.k = [pool(s.k_dim, s, dtype) for s in shapes]
        self.v = [pool(s.v_dim, s, dtype) for s in shapes]
        self.pos = [pool(None, s, POS_DTYPE) for s in shapes]
        self.score = [pool(None, s, SCORE_DTYPE) for s in shapes]
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def _slots(self, table: list[int], n: int) -> Tensor:
        j = torch.arange(n)
        return torch.tensor(table[: ceil_div(n, self.bs)], dtype=torch.long)[j // self.bs] * self.bs + j % self.bs

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        k_new, v_new = self._staged.pop(layer)
        out = q.new_empty(q.shape[0], q.shape[1], v_new.shape[-1])
        s = self.shapes[layer]
        geom = LayerGeometry(layer, q.shape[1], s.kv_heads, s.k_dim, s.v_dim)
        for cur, new, table, rows in self.sequences(batch):
            cache = self._gather(layer, geom, table, cur)
            for i, row in enumerate(range(rows.start, rows.stop)):
                # The evaluator's step: evict if full, store the token, attend, add its attention to the scores.
                out[row] = cache.step(q[row][None], k_new[row][None], v_new[row][None], scale, cur + i)[0]
            if cache.state.n != self.policy.slots_for(new):
                raise RuntimeError(f"eviction kept {cache.state.n} tokens, the cache reserved "
                                   f"{self.policy.slots_for(new)}")
            self._scatter(layer, table, cache)
        return out

    def _gather(self, layer: int, geom: LayerGeometry, table: list[int], cur: int) -> EvictionCache:
        """The evaluator's cache for one sequence, holding that sequence's kept slots."""
        n = self.policy.slots_for(cur)
        idx = self._slots(table, n)
        cache = EvictionCache(self.rule, geom, 1, self.dtype)
        st = cache.state

        def rows(pools: list[Tensor]) -> Tensor:  # slots of one layer -> [1, kv_heads, n, ...]
            flat = pools[layer].view(-1, *pools[layer].shape[2:])
            return flat[idx].movedim(0, 1)[None].contiguous()

        st.k, st.v, st.pos, st.score = rows(self.k), rows(self.v), rows(self.pos).long(), rows(self.score)
        st.n, st.seen = n, cur
        return cache

    def _scatter(self, layer: int, table: list[int], cache: EvictionCache) -> None:
        st = cache.state
        idx = self._slots(table, st.n)
        for pools, t in ((self.k, st.k), (self.v, st.v), (self.pos, st.pos), (self.score, st.score)):
            flat = pools[layer].view(-1, *pools[layer].shape[2:])
            flat[idx] = t[0, :, : st.n].movedim(0, 1).to(flat.dtype)
