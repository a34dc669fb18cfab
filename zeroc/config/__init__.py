"""Typed configuration, the lowest layer: plain data that imports nothing else from the project and no torch.

- `zeroc.config.model`: the model schema, what a Hugging Face ``config.json`` says (`ModelConfig`) plus
  ZeroC's compression layout;
- `zeroc.config.settings`: the runtime settings, one section per component under the root `ZeroCConfig`
  (each field has a ``ZEROC_*`` environment equivalent); each component receives only its own section;
- `zeroc.config.errors`: the errors a user can cause and fix (the CLI prints them as one line).
"""

from zeroc.config.errors import ConfigError, ZeroCError
from zeroc.config.model import (ATTENTION_BACKENDS, BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL, REPO_ROOT,
                                AttentionCompression, LayerCompression, ModelConfig, RopeConfig, check_tier,
                                dtype_name, ranks_per_head, requested_dtype)
from zeroc.config.settings import (SCHEDULING_POLICIES, CacheConfig, KvStoreConfig, MetricsConfig, ParallelConfig,
                                   RedisConfig, SchedulerConfig, SecurityConfig, ServerConfig, ThreadsConfig,
                                   TransferConfig, ZeroCConfig)

__all__ = ["ATTENTION_BACKENDS", "BUNDLED_CALIB", "BUNDLED_HELDOUT", "BUNDLED_MODEL", "REPO_ROOT",
           "AttentionCompression", "CacheConfig", "ConfigError", "KvStoreConfig", "LayerCompression",
           "MetricsConfig", "ModelConfig", "ParallelConfig", "RedisConfig", "RopeConfig", "SCHEDULING_POLICIES",
           "SchedulerConfig", "SecurityConfig", "ServerConfig", "ThreadsConfig", "TransferConfig", "ZeroCConfig",
           "ZeroCError", "check_tier", "dtype_name", "ranks_per_head", "requested_dtype"]
