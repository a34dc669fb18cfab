"""The oracle of the token-eviction methods: the product's eviction rule on dense per-layer state.

The rule itself (`zeroc.policies.eviction_rule.EvictionCache`, with the method's `keep` and
`priority`) is what is being served, so the oracle runs it as it is, batched over lockstep
sequences in dense tensors; what the comparison checks is the paged store around it (gathering a
sequence's slots, the query ring, placing tokens, prefill in chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

from oracle.base import KVPolicy, LayerKVCache, layer_geometry
from zeroc.model import Transformer
from zeroc.policies.eviction import EvictionMethod
from zeroc.policies.eviction_rule import EvictionCache


class DenseEviction(EvictionCache, LayerKVCache):
    """`EvictionCache` as an oracle layer cache (it already has `step` and `stored_bits`)."""


@dataclass(frozen=True)
class Eviction(KVPolicy):
    method: EvictionMethod

    @property
    def budget(self) -> float:  # type: ignore[override]
        return self.method.budget

    @property
    def label(self) -> str:
        return self.method.name

    def new_cache(self, model: Transformer, layer: int, batch: int) -> LayerKVCache:
        return DenseEviction(self.method, layer_geometry(model, layer), batch, model.lm_head.weight.dtype)
