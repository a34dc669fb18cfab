"""StreamingLLM (Xiao et al., 2023): keep the first tokens (attention sinks) and a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zeroc.policies.base import check_budget
from zeroc.policies.eviction import PROTECTED, EvictionPolicy, EvictionState


@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Sinks + the most recent tokens; the window is whatever the budget leaves after the sinks."""

    budget: float = 1.0
    sinks: int = 4

    name = "streamingllm"

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
