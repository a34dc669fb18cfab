"""KV-cache methods: one frozen dataclass of hyperparameters per method, one module each (KIVI, H2O,
SnapKV, StreamingLLM, Palu, int8, the ZeroC token tier), each holding its byte maths, its validation
and the store it creates for the paged cache. `zeroc serve` and `zeroc eval` run the same stores.

The registry (`zeroc.policies.registry`) names the selectable ones. This package's top level imports
only the registry, which does not import torch, so the CLI can list the names cheaply.
"""

from __future__ import annotations

from zeroc.policies.registry import (BASELINES, NONE, POLICY_NAMES, REGISTRY, STACKABLE, Entry, cache_config,
                                     make_policy, method_at_budget)

__all__ = ["BASELINES", "Entry", "NONE", "POLICY_NAMES", "REGISTRY", "STACKABLE", "cache_config", "make_policy",
           "method_at_budget"]
