"""Prefix reuse through real service processes sharing a real embedded Redis index."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kv_store.embedded import EmbeddedRedis
from kv_store.index import RedisBlockIndex
from zeroc.client import Client, ClientError
from zeroc.config import BUNDLED_HELDOUT, CacheConfig
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams

TEXT = BUNDLED_HELDOUT.read_text()


def shared_prefix_prompts(offset: int, chars: int = 2200) -> tuple[str, str]:
    """Two prompts sharing a long prefix (different text per test, so tests never warm each other)."""
    base = TEXT[offset:offset + chars]
    return base + " The first ending", base + " A second, longer and different ending"


def wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def store_info(target: str):
    with Client(target) as c:
        return c.model_info().kv_store


def test_prefix_reuse_gives_the_cold_output_disaggregated_and_colocated(services, bundled):
    cold_prompt, warm_prompt = shared_prefix_prompts(20_000)
    direct = Engine(bundled, CacheConfig()).generate(
        [cold_prompt, warm_prompt], SamplingParams(max_new_tokens=16, ignore_eos=True))
    n_warm = len(direct[1].prompt_token_ids)
    with Client(services.decode) as dis, Client(services.colocated) as col:
        cold = dis.generate(cold_prompt, max_tokens=16, ignore_eos=True)
        assert cold.usage.cached_prefix_tokens == 0
        warm = dis.generate(warm_prompt, max_tokens=16, ignore_eos=True)
        again = dis.generate(cold_prompt, max_tokens=16, ignore_eos=True)
        assert cold.token_ids == again.token_ids == direct[0].token_ids
        assert warm.token_ids == direct[1].token_ids
        # The shared full blocks came from the store: at least 80% of the prompt, and only the
        # rest traveled from the prefill service.
        assert warm.usage.cached_prefix_tokens >= 0.8 * n_warm
        assert warm.usage.cached_prefix_tokens % 16 == 0
        assert warm.usage.kv_bytes_received < 0.25 * cold.usage.kv_bytes_received
        assert again.usage.cached_prefix_tokens == (len(direct[0].prompt_token_ids) - 1) // 16 * 16
        # Colocated: blocks held by the other decode service arrive by peer fetch, then locally.
        for prompt, want in zip((cold_prompt, warm_prompt), direct):
            got = col.generate(prompt, max_tokens=16, ignore_eos=True)
            assert got.token_ids == want.token_ids
            assert got.usage.cached_prefix_tokens > 0
        info = col.model_info().kv_store
        assert info.state == "ok" and info.peer_blocks > 0 and info.hit_tokens > 0


@pytest.fixture(scope="module")
def pair():
    """Its own embedded Redis (tests restart it), a prefill service without a store (so only the
    decode services hold blocks) and two decode services with a 5-second lease."""
    from zeroc.stack import ServiceProcess

    server = EmbeddedRedis().start()
    env = {"ZEROC_REDIS_URL": server.url, "ZEROC_STORE_LEASE_S": "5", "ZEROC_REDIS_RETRY_S": "0.2"}
    procs = []
    try:
        procs.append(ServiceProcess("prefill", [], env={**env, "ZEROC_STORE_CAPACITY_MB": "0"}))
        procs += [ServiceProcess("decode", ["--prefill", procs[0].address], env=env) for _ in range(2)]
        for p in procs:
            p.wait_serving()
        yield server, procs
    finally:
        for p in procs:
            p.stop()
        server.close()


def test_peer_fetch_between_two_decode_services(pair, bundled):
    _, (_, d1, d2) = pair
    prompt, _ = shared_prefix_prompts(30_000, 1200)
    with Client(d1.address) as c1, Client(d2.address) as c2:
        first = c1.generate(prompt, max_tokens=12, ignore_eos=True)
        before = c2.model_info().kv_store.peer_blocks
        second = c2.generate(prompt, max_tokens=12, ignore_eos=True)
    assert first.usage.cached_prefix_tokens == 0
    assert second.token_ids == first.token_ids
    n = len(bundled.tokenizer.encode(prompt))
    assert second.usage.cached_prefix_tokens == (n - 1) // 16 * 16
    assert store_info(d2.address).peer_blocks - before == second.usage.cached_prefix_tokens // 16


def test_redis_stopped_and_restarted_mid_traffic_fails_no_request(pair):
    server, (_, d1, d2) = pair
    prompts = [shared_prefix_prompts(40_000 + 500 * i, 700)[i % 2] for i in range(8)]
    errors: list[Exception] = []
    done = threading.Event()
    completed = [0]

    def traffic(target: str) -> None:
        with Client(target) as c:
            i = 0
            while not done.is_set():
                try:
                    c.generate(prompts[i % len(prompts)], max_tokens=4, ignore_eos=True)
                    completed[0] += 1
                except ClientError as exc:
                    errors.append(exc)
                i += 1

    with ThreadPoolExecutor(4) as pool:
        for target in (d1.address, d2.address, d1.address, d2.address):
            pool.submit(traffic, target)
        wait_until(lambda: completed[0] >= 6)
        server.stop()
        at_stop = completed[0]
        wait_until(lambda: completed[0] >= at_stop + 6)  # requests keep completing without Redis
        wait_until(lambda: store_info(d1.address).state == "degraded")
        server.start()  # empty, as after a crash
        wait_until(lambda: all(store_info(d.address).state == "ok" for d in (d1, d2)))
        at_start = completed[0]
        wait_until(lambda: completed[0] >= at_start + 6)
        done.set()
    assert not errors
    for d in (d1, d2):
        info = store_info(d.address)
        assert info.reconnects >= 1 and info.index_errors >= 1
    # The restarted index was refilled by the holders: a prompt warmed on d1 is fetched by d2 again.
    prompt = shared_prefix_prompts(45_000, 900)[0]
    index = RedisBlockIndex(server.url)
    with Client(d1.address) as c1, Client(d2.address) as c2:
        listed = len(index.held_by(d1.address))
        c1.generate(prompt, max_tokens=2, ignore_eos=True)
        wait_until(lambda: len(index.held_by(d1.address)) > listed)  # d1's writer publishes asynchronously
        assert c2.generate(prompt, max_tokens=2, ignore_eos=True).usage.cached_prefix_tokens > 0
    assert index.held_by(d1.address) and index.held_by(d2.address)
    index.close()


def test_kill_9_of_a_holder_recomputes_and_its_entries_expire_with_the_lease(pair):
    server, (_, d1, d2) = pair
    prompt = shared_prefix_prompts(50_000, 1500)[0]
    index = RedisBlockIndex(server.url)
    with Client(d1.address) as c1:
        want = c1.generate(prompt, max_tokens=12, ignore_eos=True)
        wait_until(lambda: len(index.held_by(d1.address)) >= 20)
        # A request streaming on d1 when it dies fails cleanly (UNAVAILABLE), it does not hang.
        stream = c1.stream(prompt + " and more", max_tokens=500, ignore_eos=True)
        next(stream)
        d1.proc.kill()
        d1.proc.wait()
        with pytest.raises(ClientError) as failed:
            list(stream)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    # Within the lease d2 is still pointed at d1: the peer fetch fails and d2 computes the prompt.
    with Client(d2.address) as c2:
        got = c2.generate(prompt, max_tokens=12, ignore_eos=True)
    assert got.token_ids == want.token_ids and got.usage.cached_prefix_tokens == 0
    assert f'"peer fetch failed; recomputing", "peer": "{d1.address}"' in d2.log_path.read_text()
    # After the lease the reaper on d2 removed every entry of d1.
    wait_until(lambda: index.held_by(d1.address) == [], timeout_s=15)
    for key in index.client.scan_iter(match=f"{index.prefix}blk:*"):
        assert d1.address.encode() not in index.client.hkeys(key)
    assert index.client.sismember(f"{index.prefix}holders", d1.address) == 0
    index.close()


def test_bad_peer_and_prefill_requests_get_clear_statuses_and_health_reports_the_store(services, bundled):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kv_store.hashing import store_seed
    from zeroc.config import BUNDLED_MODEL
    from zeroc.kv_transfer import model_fingerprint
    from zeroc.v1 import kv_store_pb2 as kpb
    from zeroc.v1 import kv_store_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    seed = store_seed(model_fingerprint(BUNDLED_MODEL), bundled.config, "float32", 16)
    with grpc.insecure_channel(services.prefill) as channel:
        stub = kv_store_pb2_grpc.KvStoreServiceStub(channel)

        def status(request) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.FetchBlocks(request, timeout=30))
            return err.value.code()

        assert status(kpb.FetchBlocksRequest(block_ids=["a" * 32], seed="other")) == grpc.StatusCode.FAILED_PRECONDITION
        assert status(kpb.FetchBlocksRequest(block_ids=["short"], seed=seed)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status(kpb.FetchBlocksRequest(seed=seed)) == grpc.StatusCode.INVALID_ARGUMENT
        # Blocks nobody computed: a header saying zero, and no data.
        replies = list(stub.FetchBlocks(kpb.FetchBlocksRequest(block_ids=["0" * 32], seed=seed), timeout=30))
        assert len(replies) == 1 and replies[0].header.num_blocks == 0
        with pytest.raises(grpc.RpcError) as err:
            list(prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(
                prefill_pb2.PrefillRequest(token_ids=[5, 6, 7], cached_prefix_tokens=3), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cached_prefix_tokens" in err.value.details()
    for target in (services.prefill, services.decode, services.colocated):
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="zeroc.v1.KvStoreService"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
