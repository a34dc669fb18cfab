"""The Redis block index against a real embedded redis-server."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from kv_store.embedded import EmbeddedRedis
from kv_store.index import BlockEntry, IndexUnavailable, LeaseLostError, RedisBlockIndex


@pytest.fixture
def index(embedded_redis):
    idx = RedisBlockIndex(embedded_redis.url, namespace=f"t{uuid.uuid4().hex[:8]}")
    yield idx
    idx.close()


def entry(block_id: str, crc: int = 7) -> BlockEntry:
    return BlockEntry(block_id, "cpu", 4096, crc)


def ids(n: int, tag: str = "b") -> list[str]:
    return [f"{tag}{i:031d}" for i in range(n)]


def test_put_lookup_longest_prefix_and_remove(index):
    index.register("h1:1", 30)
    chain = ids(4)
    index.put("h1:1", [entry(b) for b in chain[:3]])
    found = index.lookup(chain)
    assert len(found) == 3  # block 3 is held by nobody: the prefix stops there
    assert [h.holder for hs in found for h in hs] == ["h1:1"] * 3
    h = found[0][0]
    assert (h.tier, h.nbytes, h.checksum, h.refcount) == ("cpu", 4096, 7, 0)
    assert time.time() + 25 < h.lease_expiry <= time.time() + 31
    index.remove("h1:1", [chain[1]])
    assert len(index.lookup(chain)) == 1  # a gap ends the usable prefix
    assert set(index.held_by("h1:1")) == {chain[0], chain[2]}


def test_refcounts_and_lru_order(index):
    index.register("h:1", 30)
    chain = ids(3)
    index.put("h:1", [entry(chain[0])])
    time.sleep(0.01)
    index.put("h:1", [entry(chain[1]), entry(chain[2])])
    time.sleep(0.01)
    index.touch("h:1", [chain[0]])
    assert index.held_by("h:1")[-1] == chain[0]  # most recently used last
    index.set_refcounts("h:1", {chain[0]: 2, "x" * 32: 5})  # a block nobody lists is skipped
    assert index.lookup(chain[:1])[0][0].refcount == 2
    assert index.lookup(["x" * 32]) == []


def test_put_without_a_lease_writes_nothing(index):
    with pytest.raises(LeaseLostError):
        index.put("nobody:1", [entry(ids(1)[0])])
    assert index.lookup(ids(1)) == []


def test_two_writers_racing_on_the_same_blocks(embedded_redis):
    """Two holders (two connections) publish, withdraw and count references on the same blocks at once;
    every update is atomic, so afterwards each holder's entries are exactly what it last wrote."""
    ns = f"race{uuid.uuid4().hex[:6]}"
    chain = ids(32)
    rounds = 40
    errors = []

    def writer(holder: str, crc: int) -> None:
        idx = RedisBlockIndex(embedded_redis.url, namespace=ns)
        try:
            idx.register(holder, 30)
            for r in range(rounds):
                idx.put(holder, [entry(b, crc) for b in chain])
                idx.set_refcounts(holder, {b: r for b in chain})
                if r % 3 == 2:
                    idx.remove(holder, chain[16:])
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            idx.close()

    threads = [threading.Thread(target=writer, args=(f"w{i}:1", 100 + i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    idx = RedisBlockIndex(embedded_redis.url, namespace=ns)
    found = idx.lookup(chain)
    # The last round (39) published all 32 blocks (39 % 3 != 2) and set refcount 39.
    assert len(found) == 32
    for holdings in found:
        by_holder = {h.holder: h for h in holdings}
        assert set(by_holder) == {"w0:1", "w1:1"}
        assert by_holder["w0:1"].checksum == 100 and by_holder["w1:1"].checksum == 101
        assert {h.refcount for h in holdings} == {rounds - 1}
    assert sorted(idx.held_by("w0:1")) == sorted(chain) == sorted(idx.held_by("w1:1"))
    idx.close()


def test_a_holder_that_stops_renewing_vanishes_within_its_lease(index):
    index.register("dead:1", 0.3)
    index.register("live:1", 30)
    chain = ids(2)
    index.put("dead:1", [entry(b) for b in chain])
    index.put("live:1", [entry(chain[0])])
    assert {h.holder for h in index.lookup(chain)[0]} == {"dead:1", "live:1"}
    time.sleep(0.5)
    # Nobody is pointed at the dead holder once its lease ran out, even before the reaper runs ...
    found = index.lookup(chain)
    assert [[h.holder for h in hs] for hs in found] == [["live:1"]]
    # ... and the reaper deletes whatever the dead holder still had listed.
    assert index.reap() == 1
    raw = index.client
    assert raw.hkeys(f"{index.prefix}blk:{chain[1]}") == []
    assert not raw.exists(f"{index.prefix}lru:dead:1")
    assert raw.smembers(f"{index.prefix}holders") == {b"live:1"}


def test_withdraw_removes_a_holder_at_once(index):
    index.register("h:1", 30)
    index.put("h:1", [entry(b) for b in ids(3)])
    index.withdraw("h:1")
    assert index.lookup(ids(3)) == [] and index.held_by("h:1") == []


def test_redis_down_raises_index_unavailable_and_a_restart_loses_the_lease():
    with EmbeddedRedis() as server:
        idx = RedisBlockIndex(server.url, timeout_s=0.5)
        idx.register("h:1", 30)
        idx.put("h:1", [entry(ids(1)[0])])
        server.stop()
        for call in (idx.ping, lambda: idx.lookup(ids(1)), lambda: idx.put("h:1", [entry(ids(1)[0])])):
            with pytest.raises(IndexUnavailable):
                call()
        server.start()  # empty: no persistence
        assert idx.lookup(ids(1)) == []
        with pytest.raises(LeaseLostError):
            idx.put("h:1", [entry(ids(1)[0])])
        idx.close()
