"""KV-cache policies: the baselines ZeroC is compared with, at an equal KV byte budget.

`make_policy(name, budget)` builds one by its `--kv-policy` name; see docs/policies.md.
"""

from __future__ import annotations

from zeroc.policies.base import KVPolicy, LayerKVCache
from zeroc.policies.h2o import H2O
from zeroc.policies.kivi import KIVI
from zeroc.policies.palu import PaluLowRank
from zeroc.policies.snapkv import SnapKV
from zeroc.policies.streaming_llm import StreamingLLM

POLICY_NAMES = ("kivi-4", "kivi-2", "streamingllm", "h2o", "snapkv", "palu")


def make_policy(name: str, budget: float) -> KVPolicy:
    """The policy called `name` (one of POLICY_NAMES) at KV budget `budget`; ValueError if unknown or invalid."""
    if name == "kivi-4":
        return KIVI(budget=budget, bits=4)
    if name == "kivi-2":
        return KIVI(budget=budget, bits=2)
    builders = {"streamingllm": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "palu": PaluLowRank}
    if name not in builders:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return builders[name](budget=budget)


__all__ = ["H2O", "KIVI", "KVPolicy", "LayerKVCache", "POLICY_NAMES", "PaluLowRank", "SnapKV", "StreamingLLM",
           "make_policy"]
