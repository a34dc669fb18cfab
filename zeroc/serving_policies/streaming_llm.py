"""StreamingLLM in the paged serving cache: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

from zeroc.policies.streaming_llm import StreamingLLM
from zeroc.serving_policies.eviction import EvictionServing


@dataclass(frozen=True)
class StreamingLLMServing(EvictionServing):
    """After t tokens a sequence keeps min(t, max(floor(budget * t), sinks + 1)) tokens per layer and
    KV head: positions [0, sinks) and the latest ones (the same for every head, unlike H2O)."""

    budget: float = 1.0  # fraction of the tokens seen (the evaluator's `--kv-budget`)
    sinks: int = 4

    def __post_init__(self) -> None:
        _ = self.rule  # the evaluator's StreamingLLM validates budget and sinks (ValueError)

    @property
    def rule(self) -> StreamingLLM:
        return StreamingLLM(budget=self.budget, sinks=self.sinks)

    @property
    def label(self) -> str:
        return f"streamingllm-b{self.budget:g}-s{self.sinks}"
