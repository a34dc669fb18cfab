"""The decode cache is sized in bytes by default: a ZeroC model whose KV takes half the bytes a token holds
twice the tokens, with no flag. Against real decode service processes (GetModelInfo) and in process."""

from __future__ import annotations

import pytest
import torch

from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL, CacheConfig
from zeroc.config.settings import DEFAULT_CACHE_BYTES
from zeroc.engine import Engine
from zeroc.kv_cache import PagedKVCache, available_memory_bytes, layer_shapes
from zeroc.loader import load_model
from zeroc.stack import ServiceProcess


def model_info(model_dir: str, *args: str):
    svc = ServiceProcess("decode", ["--colocated", "--model", model_dir, "--redis-url", "off", *args])
    try:
        svc.wait_serving()
        with Client(svc.address) as c:
            return c.model_info()
    finally:
        svc.stop()


def test_a_half_size_zeroc_model_serves_twice_the_tokens_with_no_flag(zeroc_half_dir):
    full, half = model_info(BUNDLED_MODEL), model_info(zeroc_half_dir)
    budget = DEFAULT_CACHE_BYTES
    for info in (full, half):
        assert info.kv_token_capacity == info.kv_blocks_total * info.kv_block_size
        assert budget - info.kv_cache_bytes < info.kv_cache_bytes / info.kv_blocks_total  # less than a block left
        assert info.kv_blocks_free == info.kv_blocks_total
    assert full.kv_cache_bytes == half.kv_cache_bytes == budget  # both budgets are whole blocks
    assert half.kv_token_capacity == 2 * full.kv_token_capacity


def test_the_block_count_follows_the_bytes_of_a_block(bundled, random_gqa, zeroc_half_dir):
    half = load_model(zeroc_half_dir)
    for loaded in (bundled, random_gqa):
        cfg = loaded.config
        per_token = sum(2 * cfg.num_key_value_heads * cfg.head_dim * 4 for _ in range(cfg.num_hidden_layers))
        for settings in (CacheConfig(), CacheConfig(num_bytes=12 << 20)):
            budget = settings.num_bytes or DEFAULT_CACHE_BYTES
            assert Engine(loaded, settings).cache.num_blocks == budget // (16 * per_token)
    for budget in (DEFAULT_CACHE_BYTES, 12 << 20):
        full_blocks = Engine(bundled, CacheConfig(num_bytes=budget)).cache.num_blocks
        assert Engine(half, CacheConfig(num_bytes=budget)).cache.num_blocks == 2 * full_blocks
        assert Engine(loaded, CacheConfig(num_blocks=7)).cache.num_blocks == 7  # an exact count still wins


def test_a_memory_fraction_sizes_the_cache_from_available_memory(bundled):
    cache = PagedKVCache(layer_shapes(bundled.config), CacheConfig(memory_fraction=0.002), torch.float32)
    want = 0.002 * available_memory_bytes(torch.device("cpu")) / cache.bytes_per_block
    assert abs(cache.num_blocks - want) <= 0.25 * want  # available memory moves while other processes run


@pytest.mark.parametrize("settings", [
    dict(num_blocks=8, num_bytes=1 << 20), dict(num_bytes=1, memory_fraction=0.1), dict(memory_fraction=1.5),
    dict(num_blocks=-1)])
def test_conflicting_or_impossible_capacities_are_refused(settings):
    with pytest.raises(ValueError, match="num_blocks|num_bytes|memory_fraction"):
        CacheConfig(**settings)
