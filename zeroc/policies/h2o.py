"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from zeroc.policies.base import check_budget
from zeroc.policies.eviction import EvictionPolicy, EvictionState, protect_recent


@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """Of the `keep` tokens, ceil(recent_ratio * keep) are the latest; the rest are the tokens
    that have received the most attention so far (summed over queries and the KV head's group).
    `max_tokens` caps `keep` at a fixed number of tokens per sequence (H2O's fixed cache budget)."""

    budget: float = 1.0
    recent_ratio: float = 0.5
    max_tokens: int | None = None

    name = "h2o"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not 0.0 < self.recent_ratio <= 1.0:
            raise ValueError(f"H2O recent_ratio must be in (0, 1], got {self.recent_ratio!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"H2O max_tokens must be a positive int, got {self.max_tokens!r}")

    def keep(self, seen: int) -> int:
        kept = super().keep(seen)
        return kept if self.max_tokens is None else min(kept, self.max_tokens)

    @property
    def floor_tokens(self) -> int:
        return 1

    def priority(self, state: EvictionState, keep: int) -> Tensor:
        recent = max(1, math.ceil(self.recent_ratio * keep))
        return protect_recent(state.live(state.pos), state.seen, recent) + state.live(state.score)
