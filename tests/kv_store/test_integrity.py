"""KV poisoning through a writable index fails: someone with Redis write access (but not the cluster key)
lists a rogue holder serving random KV under real block ids, with CRCs that match what it serves. The
decode service rejects the blocks (their MACs do not check out), recomputes, and answers exactly as a
clean run; it neither counts nor keeps the rogue blocks."""

from __future__ import annotations

import os
import time
from concurrent import futures

import grpc
import pytest
import torch

from kv_store.hashing import store_seed
from kv_store.index import BlockEntry, RedisBlockIndex
from kv_store.integrity import block_mac, verified_prefix
from kv_store.peer import KvStoreServicer
from kv_store.pool import BlockPool
from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL, CacheConfig
from zeroc.engine import Engine
from zeroc.kv_cache import layer_shapes
from zeroc.kv_transfer import model_fingerprint
from zeroc.rpc import add_servicer
from zeroc.sampling import SamplingParams
from zeroc.stack import ServiceProcess
from zeroc.v1 import kv_store_pb2_grpc

NAMESPACE = "poison"
PROMPT = list(range(700, 749))  # 49 tokens: the 48 sent to the store are 3 full blocks


def test_block_macs_bind_id_and_payload():
    key = os.urandom(32)
    k = [torch.randn(16, 2, 8)]
    v = [torch.randn(16, 2, 8)]
    mac = block_mac(key, "a" * 32, k, v)
    assert block_mac(key, "a" * 32, [t.clone() for t in k], v) == mac
    assert block_mac(key, "b" * 32, k, v) != mac  # another id
    assert block_mac(os.urandom(32), "a" * 32, k, v) != mac  # another key
    k2 = [k[0].clone()]
    k2[0][3, 1, 5] += 1e-6
    assert block_mac(key, "a" * 32, k2, v) != mac  # one changed value
    pools_k, pools_v = [torch.stack([k[0], k2[0]])], [torch.stack([v[0], v[0]])]
    assert verified_prefix(key, ["a" * 32, "a" * 32], [mac, mac], pools_k, pools_v, [0, 1]) == 1


@pytest.fixture
def rogue_holder(bundled):
    """A holder outside the deployment: the real FetchBlocks servicer over a pool of random KV."""
    pool = BlockPool(layer_shapes(bundled.config), 16, 8, torch.float32)
    servicer = KvStoreServicer(1 << 20)
    seed = store_seed(model_fingerprint(BUNDLED_MODEL), bundled.config, "float32", 16)  # public knowledge
    servicer.attach(pool, seed, lambda ids: None, lambda ids: None)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    add_servicer(kv_store_pb2_grpc.add_KvStoreServiceServicer_to_server, servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield pool, f"127.0.0.1:{port}"
    server.stop(0)


def test_a_rogue_holder_listed_by_redis_write_access_cannot_poison_outputs(bundled, embedded_redis, rogue_holder):
    pool, rogue = rogue_holder
    clean = Engine(bundled, CacheConfig()).generate([PROMPT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    env = {"ZEROC_REDIS_URL": embedded_redis.url, "ZEROC_STORE_NAMESPACE": NAMESPACE}
    procs = [ServiceProcess("decode", ["--colocated"], env=env) for _ in range(2)]
    index = RedisBlockIndex(embedded_redis.url, NAMESPACE)
    try:
        for p in procs:
            p.wait_serving()
        first, victim = procs
        with Client(first.address) as c:
            assert c.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids == clean.token_ids
        deadline = time.monotonic() + 30
        while len(index.held_by(first.address)) < 3:  # published by the first service's writer thread
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ids = index.held_by(first.address)
        # The attacker: random KV under those ids (with matching CRCs in its entries), the honest
        # holder's entries withdrawn, the rogue one registered in their place.
        shapes = layer_shapes(bundled.config)
        entries = []
        for b in ids:
            k = [torch.randn(16, s.kv_heads, s.k_dim) for s in shapes]
            v = [torch.randn(16, s.kv_heads, s.v_dim) for s in shapes]
            entries.append(BlockEntry(b, "cpu", pool.block_bytes, pool.insert(b, k, v, os.urandom(16))))
        index.remove(first.address, ids)
        index.register(rogue, 60)
        index.put(rogue, entries)
        with Client(victim.address) as c:
            got = c.generate(PROMPT, max_tokens=8, ignore_eos=True)
            info = c.model_info().kv_store
        assert got.token_ids == clean.token_ids
        assert got.usage.cached_prefix_tokens == 0 and info.peer_blocks == 0
        assert "failing their MAC" in victim.log_tail(20_000)
    finally:
        index.close()
        for p in procs:
            p.stop()
