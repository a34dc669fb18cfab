"""The one list of KV methods a cache can be asked for by name (`--kv-policy`), and the cache settings
that select them.

Everything that offers or checks a method reads this table: the CLI's `--kv-policy` choices,
`make_policy` (config validation: the CLI at start-up, `zeroc.caches` for every cache), the
benchmark's method table (zeroc/bench/serve/methods.py), evaluation (`zeroc eval ppl`, `zeroc eval
quality`) and the conformance tests. The table holds names, not classes, so that reading it (the
CLI's --help) does not import torch; a method's class is imported when it is built.

*To add a method*: write its class (a frozen dataclass subclassing `zeroc.policies.base.KVMethod`,
one module under zeroc/policies/) and add one `Entry` here; the conformance tests then run over it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zeroc.config import CacheConfig

if TYPE_CHECKING:  # annotations only: the method classes import torch
    from zeroc.config import ModelConfig
    from zeroc.policies.base import KVMethod


@dataclass(frozen=True)
class Entry:
    """One selectable method: its class (module:name), fixed hyperparameters, and which `CacheConfig`
    fields (`kv_budget`, `kv_max_tokens`, `kv_residual`) it takes; the others must stay at their defaults."""

    name: str
    target: str  # "module:Class"
    fixed: dict = field(default_factory=dict)
    takes: tuple[str, ...] = ()
    baseline: bool = True  # compared with ZeroC at equal budgets (int8 is stacked on ZeroC instead)
    block_size: int | None = None  # the cache block size it needs unless told (KIVI: its default group)

    def method_class(self) -> type[KVMethod]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, Entry] = {e.name: e for e in (
    Entry("kivi-4", "zeroc.policies.kivi:KIVI", {"bits": 4}, ("kv_residual",), block_size=32),
    Entry("kivi-2", "zeroc.policies.kivi:KIVI", {"bits": 2}, ("kv_residual",), block_size=32),
    Entry("streamingllm", "zeroc.policies.streaming_llm:StreamingLLM", takes=("kv_budget",)),
    Entry("h2o", "zeroc.policies.h2o:H2O", takes=("kv_budget", "kv_max_tokens")),
    Entry("snapkv", "zeroc.policies.snapkv:SnapKV", takes=("kv_budget",)),
    Entry("palu", "zeroc.policies.palu:Palu", takes=("kv_budget",)),
    Entry("int8", "zeroc.policies.int8:Int8", baseline=False),
)}
NONE = "none"  # the plain full-precision cache
POLICY_NAMES = tuple(REGISTRY)  # every method a cache can be asked for
BASELINES = tuple(n for n, e in REGISTRY.items() if e.baseline)  # compared with ZeroC at equal budgets
STACKABLE = tuple(n for n, e in REGISTRY.items() if not e.baseline)  # stacked on ZeroC's compressed cache
_FIELDS = {"kv_budget": ("budget", 1.0, "--kv-budget"), "kv_max_tokens": ("max_tokens", 0, "--kv-max-tokens"),
           "kv_residual": ("residual", 0, "--kv-residual")}


def make_policy(cfg: CacheConfig) -> KVMethod | None:
    """The method `cfg.kv_policy` names with its `kv_*` settings (None for "none"); ValueError if unknown
    or misused, naming the flag or the hyperparameter."""
    name = cfg.kv_policy
    if name == NONE:
        if (cfg.kv_budget, cfg.kv_max_tokens, cfg.kv_residual) != (1.0, 0, 0):
            raise ValueError("--kv-budget, --kv-max-tokens and --kv-residual need a --kv-policy")
        return None
    if name not in REGISTRY:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {', '.join((NONE, *POLICY_NAMES))}")
    entry, kwargs = REGISTRY[name], {}
    for setting, (param, default, flag) in _FIELDS.items():
        value = getattr(cfg, setting)
        if setting in entry.takes:
            kwargs[param] = value
        elif value != default:
            if setting == "kv_budget":
                raise ValueError(f"--kv-budget does not apply to {name} (it keeps every token; its size follows "
                                 "from its bits)")
            users = " and ".join(n for n, e in REGISTRY.items() if setting in e.takes)
            raise ValueError(f"{flag} applies to {users} only, not {name}")
    method = entry.method_class()(**entry.fixed, **kwargs)
    method.check([], cfg.block_size)  # the block size now; layer widths once the model is known
    return method


def method_at_budget(name: str, budget: float, cfg: ModelConfig, tokens: int) -> KVMethod:
    """`name` holding at most `budget` of the fp16 cache of `cfg` after `tokens` tokens (evaluation at equal
    budgets); ValueError if it cannot."""
    if name not in REGISTRY:
        raise ValueError(f"unknown KV policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    entry = REGISTRY[name]
    return entry.method_class().at_budget(budget, cfg, tokens, **entry.fixed)


def cache_config(method: KVMethod, **cache) -> CacheConfig:
    """The `CacheConfig` naming `method` (so that `make_policy` rebuilds it), with the other `cache` fields;
    ValueError for a method the settings cannot name."""
    name = next((n for n, e in REGISTRY.items() if e.method_class() is type(method)
                 and all(getattr(method, k) == v for k, v in e.fixed.items())), None)
    if name is None:
        raise ValueError(f"{method.label} is not a --kv-policy method")
    cfg = CacheConfig(kv_policy=name, **{**cache, **method.settings()})
    named = make_policy(cfg)
    if named.label != method.label:  # a hyperparameter the settings cannot name (e.g. StreamingLLM's sinks)
        raise ValueError(f"{method} stores KV as {method.label}, and what the cache settings can name stores it "
                         f"as {named.label}; serve it with its defaults for the other hyperparameters")
    return cfg
