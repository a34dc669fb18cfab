from __future__ import annotations

import pytest
import torch

from zeroc.config import CacheConfig
from zeroc.kv_cache import CacheFullError, FreeListAllocator, LayerShape, PagedKVCache


def _cache(blocks=8, block_size=4) -> PagedKVCache:
    return PagedKVCache([LayerShape(2, 8, 6)] * 2, CacheConfig(block_size, blocks), torch.float32)


def test_allocator_rejects_double_free_and_overdraw():
    alloc = FreeListAllocator(3)
    blocks = alloc.allocate(2)
    assert len(set(blocks)) == 2 and alloc.num_free == 1
    with pytest.raises(CacheFullError):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocation takes nothing
    alloc.free(blocks)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(blocks[:1])


def test_schedule_maps_tokens_to_slots_of_their_blocks():
    cache = _cache()
    batch = cache.schedule([("a", 6), ("b", 1)])
    table_a, table_b = cache.block_table("a"), cache.block_table("b")
    assert len(table_a) == 2 and len(table_b) == 1
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 5, 0]
    expected = [table_a[p // 4] * 4 + p % 4 for p in range(6)] + [table_b[0] * 4]
    assert batch.slot_mapping.tolist() == expected
    assert batch.seq_lens.tolist() == [6, 1]
    assert batch.query_start_loc.tolist() == [0, 6, 7]
    assert batch.last_token_indices.tolist() == [5, 6]
    # Appending 2 tokens to "a" fills its second block without a new one; 3 would need one.
    assert cache.blocks_needed("a", 2) == 0 and cache.blocks_needed("a", 3) == 1


def test_schedule_is_all_or_nothing_and_free_returns_every_block():
    cache = _cache(blocks=3)
    cache.schedule([("a", 8)])
    with pytest.raises(CacheFullError):
        cache.schedule([("b", 2), ("c", 5)])
    assert cache.seq_len("b") == 0 and cache.num_free_blocks == 1
    cache.free("a")
    cache.free("a")  # idempotent
    assert cache.num_free_blocks == 3 and cache.live_sequences == 0


def test_truncate_takes_back_slots_and_frees_the_blocks_left_empty():
    cache = _cache(blocks=4)
    cache.schedule([("a", 5)])
    kept = cache.block_table("a")[:1]
    cache.append_slots([("a", 6)])  # 11 slots: 3 blocks
    cache.truncate("a", 4)  # a draft the model did not keep
    assert cache.seq_len("a") == 4 and cache.block_table("a") == kept and cache.num_free_blocks == 3
    assert cache.append_slots([("a", 1)])[0][0] == 4  # the next token goes where the draft's first was
    cache.truncate("a", 5)
    with pytest.raises(ValueError, match="cannot cut"):
        cache.truncate("a", 6)
    cache.free("a")
    assert cache.num_free_blocks == 4


def test_write_puts_each_token_in_its_slot_per_layer():
    cache = _cache()
    batch = cache.schedule([("a", 5)])
    k = torch.randn(5, 2, 8)
    v = torch.randn(5, 2, 6)
    cache.write(1, batch.slot_mapping, k, v)
    k_pool, v_pool = cache.layer(1)
    table = cache.block_table("a")
    for pos in range(5):
        assert torch.equal(k_pool[table[pos // 4], pos % 4], k[pos])
        assert torch.equal(v_pool[table[pos // 4], pos % 4], v[pos])
    assert cache.layer(0)[0].abs().sum() == 0  # other layers untouched
