"""KV policies of the paged serving cache (`--kv-policy` of `zeroc serve` and `zeroc generate`).

`make_serving_policy(cache_config)` builds the policy a `CacheConfig` names (None for "none",
the plain full-precision cache). The streaming-evaluation policies are in `zeroc.policies`;
each serving policy here reproduces one of them exactly (docs/policies.md, "In serving").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zeroc.serving_policies.base import PolicyStore, ServingKVPolicy
from zeroc.serving_policies.h2o import H2OServing
from zeroc.serving_policies.int8 import Int8Serving
from zeroc.serving_policies.kivi import KIVIServing
from zeroc.serving_policies.palu import PaluServing
from zeroc.serving_policies.snapkv import SnapKVServing
from zeroc.serving_policies.streaming_llm import StreamingLLMServing

if TYPE_CHECKING:
    from zeroc.config import CacheConfig

SERVING_POLICY_NAMES = ("none", "kivi-4", "kivi-2", "h2o", "streamingllm", "snapkv", "palu", "int8")
BUDGETED = {"streamingllm": StreamingLLMServing, "snapkv": SnapKVServing, "palu": PaluServing}  # --kv-budget only


def make_serving_policy(cfg: CacheConfig) -> ServingKVPolicy | None:
    """The policy `cfg.kv_policy` names with its `kv_*` settings; ValueError if unknown or misused."""
    name = cfg.kv_policy
    if name not in SERVING_POLICY_NAMES:
        raise ValueError(f"unknown KV policy {name!r} for serving; choose one of {', '.join(SERVING_POLICY_NAMES)}")
    if name == "none":
        if (cfg.kv_budget, cfg.kv_max_tokens, cfg.kv_residual) != (1.0, 0, 0):
            raise ValueError("--kv-budget, --kv-max-tokens and --kv-residual need a --kv-policy")
        return None
    if name != "h2o" and cfg.kv_max_tokens:
        raise ValueError(f"--kv-max-tokens applies to h2o only, not {name}")
    if (name.startswith("kivi") or name == "int8") and cfg.kv_budget != 1.0:
        raise ValueError(f"--kv-budget does not apply to {name} (it keeps every token; its size follows from "
                         "its bits)")
    if name.startswith("kivi"):
        policy: ServingKVPolicy = KIVIServing(bits=int(name[-1]), residual=cfg.kv_residual)
    elif cfg.kv_residual:
        raise ValueError(f"--kv-residual applies to kivi-4 and kivi-2 only, not {name}")
    elif name == "int8":
        policy = Int8Serving()
    elif name in BUDGETED:
        policy = BUDGETED[name](budget=cfg.kv_budget)
    else:
        policy = H2OServing(budget=cfg.kv_budget, max_tokens=cfg.kv_max_tokens)
    policy.check([], cfg.block_size)  # the block size now; layer widths once the model is known
    return policy


__all__ = ["H2OServing", "Int8Serving", "KIVIServing", "PaluServing", "PolicyStore", "SERVING_POLICY_NAMES",
           "ServingKVPolicy", "SnapKVServing", "StreamingLLMServing", "make_serving_policy"]
