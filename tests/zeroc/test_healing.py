"""A stack that heals, with real processes: a decode service prefills locally while its prefill
service is away (`--prefill-fallback local`, or fails with `fail`), and `Stack.wait` restarts a
killed service on its ports, after which clients and the decode -> prefill channel reconnect."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

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
        assert target not in err.value.details and target.split(":")[1] not in err.value.details  # internal
    finally:
        for p in procs:
            p.stop()


def wait_for(predicate, timeout_s: float) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "not reached"
        time.sleep(0.05)
    return time.monotonic() - start


def test_the_stack_restarts_a_killed_prefill_service_and_the_decode_channel_reconnects(want):
    """(kill -9 of the decode service under the same supervision: tests/zeroc/bench/test_chaos.py.)"""
    with Stack(1, env={"ZEROC_REDIS_URL": "off"}) as stack:
        supervisor = threading.Thread(target=lambda: setattr(stack, "exit_code", stack.wait()), daemon=True)
        supervisor.start()
        prefill, decode = stack.services
        # The prefill service killed: the decode service prefills locally meanwhile, and uses the
        # restarted prefill service (same ports) again once it serves.
        os.kill(prefill.proc.pid, signal.SIGKILL)
        with Client(decode.address) as c:
            assert c.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids == want
        wait_for(lambda: stack.services[0] is not prefill and stack.services[0].proc.poll() is None, 30)
        assert stack.services[0].internal_address == prefill.internal_address
        stack.services[0].wait_serving(120)
        with Client(decode.address) as c:
            def remote() -> bool:
                got = c.generate(PROMPT, max_tokens=4, ignore_eos=True)
                return got.token_ids == want and got.usage.kv_bytes_received > 0
            assert wait_for(remote, 10) < 5  # the channel reconnected (max backoff 1 s)
        stack.stop()
        supervisor.join(10)
        assert stack.exit_code == 0


def _marked_pids(mark: str, redis_dir: str = "\x00none") -> list[int]:
    """Processes whose environment carries `mark`, or whose command line names `redis_dir`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as env, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                    if mark.encode() in env.read() or redis_dir.encode() in cmd.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")
def test_zeroc_stack_up_and_everything_it_started_die_with_its_parent():
    mark = f"ZEROC_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1], "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(["bash", "-c", f"{sys.executable} -m zeroc.cli stack up --decode 1 & wait"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    redis_dir = "\x00none"
    try:
        for line in parent.stdout:  # the stack prints "ready; ..." once every service serves
            if line.startswith("kv store index:"):
                redis_dir = line.split("unix://")[1].rsplit("/", 1)[0]
            if line.startswith("ready"):
                break
        assert len(_marked_pids(mark, redis_dir)) >= 5  # bash, the stack, prefill, decode, redis-server
        parent.send_signal(signal.SIGTERM)  # as when `make run` is signalled
        parent.wait(10)
        wait_for(lambda: not _marked_pids(mark, redis_dir), 60)
    finally:
        for pid in _marked_pids(mark, redis_dir):
            os.kill(pid, signal.SIGKILL)
        parent.stdout.close()
