"""KV-cache policies: the baselines ZeroC is compared with, at an equal KV byte budget.

`make_policy(name, budget)` builds one by its `--kv-policy` name; see docs/policies.md. Besides the
baselines (POLICY_NAMES), `int8` quantises whatever K/V a model has: it is stacked on ZeroC's
compressed cache (STACKABLE_NAMES), not a baseline of its own.
"""

from __future__ import annotations

from zeroc.policies.base import KVPolicy, LayerKVCache
from zeroc.policies.h2o import H2O
from zeroc.policies.int8 import Int8
from zeroc.policies.kivi import KIVI
from zeroc.policies.palu import PaluLowRank
from zeroc.policies.snapkv import SnapKV
from zeroc.policies.streaming_llm import StreamingLLM

POLICY_NAMES = ("kivi-4", "kivi-2", "streamingllm", "h2o", "snapkv", "palu")
STACKABLE_NAMES = ("int8",)


def make_policy(name: str, budget: float) -> KVPolicy:
    """The policy called `name` (in POLICY_NAMES or STACKABLE_NAMES) at KV budget `budget`; ValueError if
    unknown or invalid."""
    if name == "kivi-4":
        return KIVI(budget=budget, bits=4)
    if name == "kivi-2":
        return KIVI(budget=budget, bits=2)
    builders = {"streamingllm": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "palu": PaluLowRank, "int8": Int8}
    if name not in builders:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {', '.join(POLICY_NAMES + STACKABLE_NAMES)}")
    return builders[name](budget=budget)


__all__ = ["H2O", "KIVI", "Int8", "KVPolicy", "LayerKVCache", "POLICY_NAMES", "PaluLowRank", "STACKABLE_NAMES",
           "SnapKV", "StreamingLLM", "make_policy"]
