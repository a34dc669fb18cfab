"""The SDK over several decode replicas (three real processes): gRPC's round_robin spreads the calls, a
replica killed mid-run fails only the streams it had started, and no call outlives its deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import pytest

from service_checks import Scrape, assert_no_leak, free_port, wait_until
from zeroc.client import AsyncClient, Chunk, Client, ClientError, RetryPolicy, balancing_options, channel_target
from zeroc.stack import ServiceProcess

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def replicas():
    ports = [free_port() for _ in range(3)]
    # Replica 0 runs one sequence at a time, so calls wait there for their first token: killing it then
    # shows that those are retried elsewhere.
    envs = [{"ZEROC_SCHEDULER_MAX_NUM_SEQS": "1"}, {}, {}]
    procs = [ServiceProcess("decode", ["--colocated", "--redis-url", "off", "--metrics-port", str(port)], env=env)
             for port, env in zip(ports, envs)]
    try:
        for p in procs:
            p.wait_serving()
        yield SimpleNamespace(procs=procs, ports=ports, addresses=[p.address for p in procs])
    finally:
        for p in procs:
            p.stop()


def served(ports: list[int]) -> list[float]:
    """Requests each replica finished so far (its own metrics)."""
    return [Scrape(port)("zeroc:e2e_request_latency_seconds_count") for port in ports]


def test_targets_name_several_replicas():
    assert channel_target("127.0.0.1:5") == "127.0.0.1:5"
    assert channel_target("dns:///decode.zeroc.svc:50051") == "dns:///decode.zeroc.svc:50051"
    assert channel_target(["127.0.0.1:5", "127.0.0.2:6"]) == "ipv4:127.0.0.1:5,127.0.0.2:6"
    assert channel_target(["[::1]:5", "[::1]:6"]) == "ipv6:[::1]:5,[::1]:6"
    # A set of replicas is health-checked (NOT_SERVING ones take no calls); one address answers for itself.
    for target, checked in (("127.0.0.1:5", False), (["127.0.0.1:5", "127.0.0.2:6"], True),
                            ("dns:///decode:5", True), ("ipv4:127.0.0.1:5,127.0.0.2:6", True)):
        (name, config), = balancing_options(target)
        assert name == "grpc.service_config" and "round_robin" in config and ("healthCheckConfig" in config) == checked
    for bad in (["decode-0:5", "decode-1:5"], ["127.0.0.1:5", "[::1]:5"], [], ["127.0.0.1:x", "127.0.0.1:5"]):
        with pytest.raises(ValueError, match="target"):
            channel_target(bad)


def test_round_robin_spreads_calls_and_deadlines_and_cancellation_hold(replicas):
    with Client(replicas.addresses, timeout=TIMEOUT_S) as c:
        _warm(c, replicas.ports)
        before = served(replicas.ports)
        results = [c.generate(f"Call {i}", max_tokens=3, ignore_eos=True) for i in range(12)]
        assert all(len(r.token_ids) == 3 for r in results)
        spread = [a - b for a, b in zip(served(replicas.ports), before)]
        assert spread == [4, 4, 4], spread  # every replica took its share
    # Each result names the replica process that served it: the three ids are those each replica gives alone.
    ids = [_replica_id(a) for a in replicas.addresses]
    assert len(set(ids)) == 3 and all(ids) and Counter(r.replica for r in results) == {i: 4 for i in ids}
    with Client(replicas.addresses, timeout=TIMEOUT_S) as c:

        stream = c.stream("A long answer", max_tokens=1500, ignore_eos=True)
        assert isinstance(next(stream), Chunk)
        stream.close()  # cancels the call: whichever replica ran it frees its blocks
    for address in replicas.addresses:
        assert_no_leak(address)

    async def concurrently() -> list:
        async with AsyncClient(replicas.addresses, timeout=TIMEOUT_S) as ac:
            return await asyncio.gather(*(ac.generate(f"Async {i}", max_tokens=2, ignore_eos=True) for i in range(6)))

    before = served(replicas.ports)
    assert [len(r.token_ids) for r in asyncio.run(concurrently())] == [2] * 6
    assert sum(a - b for a, b in zip(served(replicas.ports), before)) == 6

    with Client(replicas.addresses, timeout=0.5) as short:
        started = time.monotonic()
        with pytest.raises(ClientError) as err:
            short.generate("Too long for the deadline", max_tokens=1900, ignore_eos=True)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 5


def _replica_id(address: str) -> str:
    with Client(address, timeout=TIMEOUT_S) as c:
        return c.generate("Which replica?", max_tokens=1).replica


def _call(c: Client, i: int, outcomes: list) -> None:
    """One streamed call: appends (i, whether a token arrived, the error code or None, seconds taken, the
    replica that had accepted it)."""
    started, t0 = False, time.monotonic()
    try:
        for item in c.stream(f"Story number {i}:", max_tokens=150, ignore_eos=True):
            started = started or isinstance(item, Chunk)
        outcomes.append((i, started, None, time.monotonic() - t0, item.replica))
    except ClientError as exc:
        outcomes.append((i, started, exc.code, time.monotonic() - t0, exc.replica))


def _warm(c: Client, ports: list[int]) -> None:
    """Call until every replica has answered one: round_robin then has a connection to each."""
    base = served(ports)

    def all_served() -> bool:
        c.generate("warm up", max_tokens=1)
        return min(a - b for a, b in zip(served(ports), base)) > 0

    wait_until(all_served, 60)


def _holding(m: Scrape) -> bool:
    return m("zeroc:num_requests_running") == 1 and m("zeroc:num_requests_waiting") >= 1


def test_a_replica_killed_mid_run_fails_only_streams_it_had_started(replicas):
    killed, port0 = replicas.procs[0], replicas.ports[0]
    killed_id = _replica_id(replicas.addresses[0])
    outcomes: list = []
    with Client(replicas.addresses, timeout=TIMEOUT_S, retry=RetryPolicy(attempts=6, initial_backoff_s=0.05)) as c:
        _warm(c, replicas.ports)
        wave = [threading.Thread(target=_call, args=(c, i, outcomes)) for i in range(9)]
        for t in wave:
            t.start()
        # Replica 0 streams one call and holds the others before their first token: kill it now.
        wait_until(lambda: _holding(Scrape(port0)), 60)
        killed.proc.kill()
        killed.proc.wait()
        later = [threading.Thread(target=_call, args=(c, 100 + i, outcomes)) for i in range(6)]
        for t in later:
            t.start()
        for t in wave + later:
            t.join(TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in wave + later), "a call outlived its deadline"
    failed = [o for o in outcomes if o[2] is not None]
    assert len(outcomes) == 15
    # Only the one stream replica 0 was running may fail (its tokens cannot be replayed); every call still
    # waiting there for its first token, and every later call, succeeded on the other replicas.
    assert len(failed) == 1 and all(started and code == grpc.StatusCode.UNAVAILABLE and replica == killed_id
                                    for _, started, code, _, replica in failed), failed
    assert all(o[2] is None for o in outcomes if o[0] >= 100)
    assert max(o[3] for o in outcomes) < TIMEOUT_S + 5
    for address in replicas.addresses[1:]:
        assert_no_leak(address)
