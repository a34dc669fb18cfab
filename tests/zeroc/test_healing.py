"""A stack that heals, with real processes: a decode service prefills locally while its prefill
service is away (`--prefill-fallback local`, or fails with `fail`), and `Stack.wait` restarts a
killed service on its ports, after which clients and the decode -> prefill channel reconnect."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import grpc
import pytest

from zeroc.client import Client, ClientError
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams
from zeroc.stack import ServiceProcess, Stack

PROMPT = list(range(40, 75))


@pytest.fixture(scope="module")
def want(bundled) -> list[int]:
    return Engine(bundled, CacheConfig()).generate([PROMPT], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids


def dead_address() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_without_its_prefill_service_a_decode_service_prefills_locally_or_fails_by_policy(want):
    target = dead_address()
    procs = [ServiceProcess("decode", ["--prefill", target, "--redis-url", "off"]),
             ServiceProcess("decode", ["--prefill", target, "--redis-url", "off", "--prefill-fallback", "fail"])]
    try:
        for p in procs:
            p.wait_serving()
        with Client(procs[0].address) as c:
            got = c.generate(PROMPT, max_tokens=4, ignore_eos=True)
        assert got.token_ids == want and got.usage.kv_bytes_received == 0
        with Client(procs[1].address) as c, \
                pytest.raises(ClientError) as err:
            c.generate(PROMPT, max_tokens=4, ignore_eos=True)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        for p in procs:
            p.stop()


def wait_for(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "not reached"
        time.sleep(0.05)
    return time.monotonic() - start


def test_the_stack_restarts_killed_services_on_their_ports_and_traffic_resumes(want):
    with Stack(1, env={"ZEROC_REDIS_URL": "off"}) as stack:
        supervisor = threading.Thread(target=lambda: setattr(stack, "exit_code", stack.wait()), daemon=True)
        supervisor.start()
        prefill, decode = stack.services
        address = decode.address
        os.kill(decode.proc.pid, signal.SIGKILL)
        wait_for(lambda: stack.services[1] is not decode and stack.services[1].proc.poll() is None, 30)
        assert stack.services[1].address == address
        stack.services[1].wait_serving(120)
        with Client(address) as c:
            assert c.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids == want
        # The prefill service killed: the decode service prefills locally meanwhile, and uses the
        # restarted prefill service again once it serves.
        os.kill(prefill.proc.pid, signal.SIGKILL)
        with Client(address) as c:
            assert c.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids == want
        wait_for(lambda: stack.services[0] is not prefill and stack.services[0].proc.poll() is None, 30)
        stack.services[0].wait_serving(120)
        with Client(address) as c:
            def remote() -> bool:
                return c.generate(PROMPT, max_tokens=4, ignore_eos=True).usage.kv_bytes_received > 0
            assert wait_for(remote, 10) < 5  # the channel reconnected (max backoff 1 s)
        stack.stop()
        supervisor.join(10)
        assert stack.exit_code == 0
