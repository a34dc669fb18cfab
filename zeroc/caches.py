"""Building a model's paged KV cache with the policy its settings and its weights call for.

`PagedKVCache` (the cache layer) takes its policy as an object; this module, a layer above it, picks that
policy: a token tier's store for a model that keeps one (never a flag), else the `--kv-policy` the cache
settings name (`zeroc.policies.make_policy`), else none (the plain full-precision pools). Callers that build a
cache to serve a model (the engine, the prefill worker, evaluation, benchmarks) go through `paged_cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zeroc.config import CacheConfig, ModelConfig
from zeroc.kv_cache import BlockAllocator, LayerShape, PagedKVCache, block_bytes, layer_shapes
from zeroc.policies import make_policy
from zeroc.policies.base import KVMethod
from zeroc.policies.tier import tier_policy

if TYPE_CHECKING:  # annotations only: the model sits above this layer
    from zeroc.model import Transformer


def cache_policy(cache: CacheConfig, model: ModelConfig | None) -> KVMethod | None:
    """The policy of a cache for `model` with settings `cache`; ValueError for combinations that cannot run."""
    policy = make_policy(cache)
    if model is not None and model.has_tier:
        if policy is not None:
            raise ValueError(f"--kv-policy {cache.kv_policy} does not combine with a model that keeps a token "
                             "tier (it brings its own cache form); serve it with --kv-policy none")
        return tier_policy(model)
    return policy


def paged_cache(shapes: list[LayerShape], cfg: CacheConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                model: Transformer | None = None, allocator: BlockAllocator | None = None) -> PagedKVCache:
    """A paged cache for `model` (its store fits itself to the weights: Palu's bases, the tier's widths)."""
    policy = cache_policy(cfg, None if model is None else model.config)
    return PagedKVCache(shapes, cfg, dtype, device, allocator=allocator, model=model, policy=policy)


def sequence_blocks(cfg: ModelConfig, block_size: int, tokens: int, cache: CacheConfig | None = None,
                    dtype: torch.dtype = torch.float32, step: int = 1) -> int:
    """Blocks one sequence of up to `tokens` tokens holds in the cache `cache` names for the model `cfg`
    (default: its plain cache), the blocks its policy borrows included (a token tier's rows, KIVI's tail,
    SnapKV's queries) at any moment of a step of up to `step` tokens: what sizing a cache for whole
    sequences needs (a chunked prefill passes its chunk)."""
    policy = cache_policy(cache or CacheConfig(block_size=block_size), cfg)
    if policy is None:
        return -(-tokens // block_size)
    return policy.sequence_blocks(cfg, layer_shapes(cfg), block_size, tokens, dtype, step)


def kv_footprint(cache: PagedKVCache, model: ModelConfig, cfg: CacheConfig) -> tuple[float, float]:
    """(bytes `cache` stores per token of a sequence as long as the model's context, the full-precision bytes
    per token of the uncompressed model): their ratio is what the ranks and the KV policy save."""
    tokens = model.max_position_embeddings
    per_block = (cache.policy.block_bytes(cache.shapes, cache.block_size, cache.dtype) if cache.policy is not None
                 else block_bytes(cache.shapes, cache.block_size, cache.dtype))
    stored = sequence_blocks(model, cache.block_size, tokens, cfg, cache.dtype) * per_block / tokens
    item = torch.empty((), dtype=cache.dtype).element_size()
    dense = 2 * item * model.num_hidden_layers * model.num_key_value_heads * model.head_dim
    return stored, float(dense)
