"""The store facade in one process: pool + real Redis index + writer and lease threads."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
import torch

from kv_store.embedded import EmbeddedRedis
from kv_store.index import RedisBlockIndex
from kv_store.pool import BlockPool
from kv_store.store import KvStore
from zeroc.config import CacheConfig, KvStoreConfig
from zeroc.kv_cache import LayerShape, PagedKVCache

SHAPES = [LayerShape(2, 8, 4), LayerShape(2, 4, 8)]
BS = 4


def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def make_store(url: str, capacity: int, holder: str = "h:1", lease_s: float = 30.0, ns: str | None = None) -> KvStore:
    pool = BlockPool(SHAPES, BS, capacity, torch.float32)
    index = RedisBlockIndex(url, namespace=ns or f"s{uuid.uuid4().hex[:8]}", timeout_s=0.5)
    store = KvStore(pool, index, holder, "seed", KvStoreConfig(lease_s=lease_s), retry_s=0.1, fetcher=None,
                    index_name=url)
    wait_until(lambda: store.state == "ok")
    return store


def filled_cache(tokens: int, seq: str = "s") -> tuple[PagedKVCache, list[int]]:
    """A cache holding random KV for one sequence of `tokens` tokens; returns it and the block table."""
    cache = PagedKVCache(SHAPES, CacheConfig(BS, 64), torch.float32)
    cache.schedule([(seq, tokens)])
    for pools in (cache.k_pools, cache.v_pools):
        for p in pools:
            p.normal_()
    return cache, cache.block_table(seq)


def test_offer_then_load_moves_exact_kv_into_another_cache(embedded_redis):
    store = make_store(embedded_redis.url, 16)
    try:
        prompt = list(range(1000, 1014))  # 3 full blocks and 2 tokens
        src, table = filled_cache(len(prompt))
        store.offer(prompt, src, table)
        wait_until(lambda: len(store.index.held_by(store.holder)) == 3)
        plan = store.plan(prompt + [5, 6])
        assert plan.tokens == 12 and plan.sources == [None] * 3
        dst = PagedKVCache(SHAPES, CacheConfig(BS, 64), torch.float32)
        dst.schedule([("other", 7)])  # occupy some blocks so the slots differ
        slots = dst.schedule([("r", 12)]).slot_mapping
        result = store.load(plan, dst, slots)
        assert (result.tokens, result.local_blocks, result.peer_blocks) == (12, 3, 0)
        for layer in range(len(SHAPES)):
            for got, want in ((dst.k_pools, src.k_pools), (dst.v_pools, src.v_pools)):
                a = got[layer].flatten(0, 1)[slots]
                b = want[layer][torch.tensor(table[:3])].flatten(0, 1)
                assert torch.equal(a, b)
        entries = store.index.lookup(plan.block_ids)
        assert [hs[0].checksum for hs in entries] == [store.pool.checksum(b) for b in plan.block_ids]
        assert store.stats().hit_tokens == 12
    finally:
        store.close()


def test_eviction_never_leaves_an_index_entry_without_data_and_spares_pinned_blocks(embedded_redis):
    store = make_store(embedded_redis.url, capacity=6)
    pinned_prompt = list(range(8))
    cache, table = filled_cache(8)
    store.offer(pinned_prompt, cache, table)
    wait_until(lambda: len(store.pool) == 2)
    pinned = store.block_ids(pinned_prompt)
    assert store.pool.pin(pinned) == 2
    violations, stop = [], threading.Event()

    def check() -> None:
        while not stop.is_set():
            with store.pool.lock:  # a consistent snapshot: the writer cannot drop data meanwhile
                listed = set(store.index.held_by(store.holder))
                stored = store.pool.stored_ids()
            if listed - stored:
                violations.append(listed - stored)

    checker = threading.Thread(target=check)
    checker.start()
    rng = random.Random(0)
    try:
        for i in range(60):
            prompt = [rng.randrange(50_000) for _ in range(BS * rng.randint(1, 4))]
            c, t = filled_cache(len(prompt), f"s{i}")
            store.offer(prompt, c, t)
            time.sleep(0.005)
        wait_until(lambda: store._ops.empty())
    finally:
        stop.set()
        checker.join()
    assert not violations
    assert store.stats().evictions > 40
    assert all(store.pool.holds(b) for b in pinned)  # in use: never evicted
    # After the churn the index lists exactly what the pool holds.
    wait_until(lambda: set(store.index.held_by(store.holder)) == set(store.pool.visible_ids()))
    store.pool.unpin(pinned)
    store.close()


def test_redis_down_degrades_to_local_reuse_and_a_restart_is_refilled():
    with EmbeddedRedis() as server:
        states = []
        store = make_store(server.url, 32)
        store.on_state = states.append
        first = list(range(200, 216))
        store.offer(first, *filled_cache(16))
        wait_until(lambda: len(store.index.held_by(store.holder)) == 4)
        server.stop()
        second = list(range(300, 316))
        store.offer(second, *filled_cache(16))  # stored locally; publishing it fails: degraded
        wait_until(lambda: store.state == "degraded" and len(store.pool) == 8)
        assert store.plan(first + [1]).tokens == 16  # local blocks still serve
        assert store.plan(second + [1]).tokens == 16
        assert store.stats().index_errors >= 1
        server.start()  # empty, as after a crash
        wait_until(lambda: store.state == "ok")
        assert states == ["degraded", "ok"]
        assert store.stats().reconnects == 1
        assert set(store.index.held_by(store.holder)) == set(store.block_ids(first) + store.block_ids(second))
        store.close()


def test_a_full_pool_of_pinned_blocks_stores_nothing_more(embedded_redis):
    store = make_store(embedded_redis.url, capacity=2)
    prompt = list(range(8))
    store.offer(prompt, *filled_cache(8))
    wait_until(lambda: len(store.pool) == 2)
    ids = store.block_ids(prompt)
    store.pool.pin(ids)
    store.offer(list(range(100, 108)), *filled_cache(8))
    wait_until(lambda: store._ops.empty())
    time.sleep(0.1)
    assert set(store.pool.visible_ids()) == set(ids)
    with pytest.raises(ValueError):
        store.pool.unpin(ids + ids)
    store.close()


def test_a_holder_that_lost_its_lease_reregisters_and_republishes(embedded_redis):
    """A stall past the lease (as SIGSTOP does): the entries are reaped meanwhile. The store notices
    at its next renewal, reports "degraded", and is "ok" again only with every block listed again."""
    store = make_store(embedded_redis.url, 16, lease_s=0.6)
    states: list[str] = []
    store.on_state = states.append
    try:
        prompt = list(range(2000, 2012))
        store.offer(prompt, *filled_cache(12))
        wait_until(lambda: len(store.index.held_by(store.holder)) == 3)
        store.index.client.delete(f"{store.index.prefix}lease:{store.holder}")  # the lease ran out ...
        assert store.index.reap() == 1 and store.index.held_by(store.holder) == []  # ... and was reaped
        wait_until(lambda: "degraded" in states and store.state == "ok")
        assert sorted(store.index.held_by(store.holder)) == sorted(store.block_ids(prompt))
        assert [h[0].holder for h in store.index.lookup(store.block_ids(prompt))] == [store.holder] * 3
    finally:
        store.close()


def test_a_lookup_waits_for_its_blocks_while_the_writer_stores_them(embedded_redis):
    """A request's other choices look its prompt up moments after it was offered: the lookup waits (at most
    settle_ms) for the blocks still queued for the writer, here behind a touch that a slow index holds for 0.5 s,
    instead of computing them again; a prompt no one offered does not wait."""
    class SlowIndex(RedisBlockIndex):
        def touch(self, holder, ids):
            time.sleep(0.5)
            super().touch(holder, ids)

    index = SlowIndex(embedded_redis.url, namespace=f"s{uuid.uuid4().hex[:8]}", timeout_s=2.0)
    store = KvStore(BlockPool(SHAPES, BS, 16, torch.float32), index, "h:1", "seed", KvStoreConfig(settle_ms=5000),
                    retry_s=0.1, fetcher=None)
    try:
        wait_until(lambda: store.state == "ok")
        prompt = list(range(2000, 2014))  # 3 full blocks
        src, table = filled_cache(len(prompt))
        store.served(["00"])  # the writer is busy for 0.5 s
        store.offer(prompt, src, table)
        assert store.pool.held_prefix(store.block_ids(prompt)) == 0  # queued behind the touch
        start = time.monotonic()
        assert store.plan(prompt).tokens == 12 and time.monotonic() - start < 4
        start = time.monotonic()
        assert store.plan(list(range(3000, 3014))).tokens == 0 and time.monotonic() - start < 0.3
    finally:
        store.close()
