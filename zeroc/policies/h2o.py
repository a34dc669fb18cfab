"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from zeroc.policies.base import check_budget
from zeroc.policies.eviction import EvictionMethod
from zeroc.policies.eviction_rule import EvictionState, protect_recent


@dataclass(frozen=True)
class H2O(EvictionMethod):
    """After t tokens a sequence keeps min(floor(budget * t), max_tokens) tokens (at least 1) per layer
    and KV head: the latest ceil(recent_ratio * kept) and those that have received the most attention
    so far (summed over queries and the KV head's group)."""

    budget: float = 1.0  # fraction of the tokens seen (`--kv-budget`)
    recent_ratio: float = 0.5
    max_tokens: int = 0  # a fixed per-sequence token budget on top (H2O's fixed cache budget); 0: none

    name = "h2o"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not isinstance(self.recent_ratio, (int, float)) or not 0.0 < self.recent_ratio <= 1.0:
            raise ValueError(f"H2O recent_ratio must be in (0, 1], got {self.recent_ratio!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"H2O max_tokens must be a non-negative int (0: no cap), got {self.max_tokens!r}")

    @property
    def label(self) -> str:
        return f"h2o-b{self.budget:g}-r{self.recent_ratio:g}-m{self.max_tokens}"

    def settings(self) -> dict:
        return {"kv_budget": self.budget, "kv_max_tokens": self.max_tokens}

    def keep(self, seen: int) -> int:
        kept = super().keep(seen)
        return min(kept, self.max_tokens) if self.max_tokens else kept

    @property
    def floor_tokens(self) -> int:
        return 1

    def priority(self, state: EvictionState, keep: int) -> Tensor:
        recent = max(1, math.ceil(self.recent_ratio * keep))
        return protect_recent(state.live(state.pos), state.seen, recent) + state.live(state.score)
