"""StreamingLLM (Xiao et al., 2023) in the paged cache: attention sinks plus a recent window.

Unlike H2O and SnapKV its kept set depends on positions only, so a prompt's K/V computed by a
prefill service running the same policy can be taken (`load`): the eviction rule is replayed
token by token on the arriving K/V without attention (`EvictionCache.admit`), which
leaves exactly the slots the colocated path would hold. Their accumulated-attention scores stay
0 (StreamingLLM never reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.policies.base import check_budget
from zeroc.policies.eviction import EvictionMethod, EvictionPools
from zeroc.policies.eviction_rule import PROTECTED, EvictionCache, EvictionState, LayerGeometry

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape


@dataclass(frozen=True)
class StreamingLLM(EvictionMethod):
    """After t tokens a sequence keeps min(t, max(floor(budget * t), sinks + 1)) tokens per layer and
    KV head: positions [0, sinks) and the latest ones (the same for every head, unlike H2O)."""

    budget: float = 1.0  # fraction of the tokens seen (`--kv-budget`)
    sinks: int = 4

    name = "streamingllm"
    transferable = True  # the kept set follows from positions alone (`StreamingLLMPools.load`)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not isinstance(self.sinks, int) or self.sinks < 1:
            raise ValueError(f"StreamingLLM needs at least 1 sink token, got sinks={self.sinks!r}")

    @property
    def floor_tokens(self) -> int:
        return self.sinks + 1  # the sinks and the current token

    def priority(self, state: EvictionState, keep: int) -> Tensor:
        # Sinks first, then recency: the kept set is positions [0, sinks) + the latest keep - sinks.
        pos = state.live(state.pos)
        return torch.where(pos < self.sinks, 2 * PROTECTED + pos.double(), pos.double())

    @property
    def label(self) -> str:
        return f"streamingllm-b{self.budget:g}-s{self.sinks}"

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> StreamingLLMPools:
        return StreamingLLMPools(self, shapes, num_blocks, block_size, dtype, device)


class StreamingLLMPools(EvictionPools):
    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim] of tokens [0, T)
        s = self.shapes[layer]
        cache = EvictionCache(self.rule, LayerGeometry(layer, s.kv_heads, s.kv_heads, s.k_dim, s.v_dim), 1,
                              self.dtype)
        for t in range(k.shape[0]):
            cache.admit(k[t][None], v[t][None], t)
        self._scatter(layer, table, cache)
