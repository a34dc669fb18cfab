"""H2O in the paged serving cache: heavy hitters by accumulated attention plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

from zeroc.policies.h2o import H2O
from zeroc.serving_policies.eviction import EvictionServing


@dataclass(frozen=True)
class H2OServing(EvictionServing):
    """After t tokens a sequence keeps min(floor(budget * t), max_tokens) tokens (at least 1) per
    layer and KV head: the latest ceil(recent_ratio * kept) and those with the most attention."""

    budget: float = 1.0  # fraction of the tokens seen (the evaluator's `--kv-budget`)
    recent_ratio: float = 0.5
    max_tokens: int = 0  # a fixed per-sequence token budget on top; 0: none

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"H2O max_tokens must be a non-negative int (0: no cap), got {self.max_tokens!r}")
        _ = self.rule  # the evaluator's H2O validates budget and recent_ratio (ValueError)

    @property
    def rule(self) -> H2O:
        return H2O(budget=self.budget, recent_ratio=self.recent_ratio, max_tokens=self.max_tokens or None)

    @property
    def label(self) -> str:
        return f"h2o-b{self.budget:g}-r{self.recent_ratio:g}-m{self.max_tokens}"
