"""Priority scheduling through real processes (`--scheduling-policy priority`, GenerateRequest.priority): a prefill
and a decode service that take one sequence at a time serve two waiting requests by priority, not arrival, through
the KV transfer (PrefillRequest.priority), the reservation queue and the engine; the session's fcfs services refuse
a priority with INVALID_ARGUMENT and go on serving; the gateway forwards vLLM's `priority` field."""

from __future__ import annotations

import threading
import time

import grpc
import openai
import pytest

from gateway_support import openai_on_gateway
from service_checks import assert_no_leak, wait_until
from zeroc.stack import ServiceProcess
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import generation_pb2_grpc

LONG = pb.SamplingParams(max_tokens=2000, ignore_eos=True)
SHORT = pb.SamplingParams(max_tokens=24, ignore_eos=True)


def _stub(target: str) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(target))


@pytest.fixture(scope="module")
def priority_stack(embedded_redis):
    shared = {"ZEROC_REDIS_URL": embedded_redis.url, "ZEROC_SCHEDULER_POLICY": "priority"}
    procs = [ServiceProcess("prefill", [], env=shared)]
    try:
        procs.append(ServiceProcess("decode", ["--prefill", procs[0].address, "--scheduling-policy", "priority"],
                                    env={**shared, "ZEROC_SCHEDULER_MAX_NUM_SEQS": "1"}))
        for p in procs:
            p.wait_serving()
        yield procs[1]
    finally:
        for p in procs:
            p.stop()


def _timed(call, times: dict, name: str) -> threading.Thread:
    """Read a stream in a thread, noting when its first token and its result came."""
    def read():
        for msg in call:
            key = "first" if msg.HasField("delta") and msg.delta.token_ids else "done" if msg.HasField("result") else ""
            times.setdefault((name, key), time.monotonic())
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _handed_to_the_engine(decode: ServiceProcess, request_id: str) -> bool:
    """Whether the service logged `request_id`'s "generate" line, which it writes once the request's KV is in and
    the request is in the engine loop's inbox (so ahead of any later command, such as a cancel)."""
    return any(f'"request_id": "{request_id}"' in line and '"msg": "generate"' in line
               for line in decode.log_path.read_text().splitlines())


def test_waiting_requests_are_served_by_priority_not_arrival(priority_stack):
    stub = _stub(priority_stack.address)
    running = stub.Generate(pb.GenerateRequest(prompt="import os", sampling=LONG, priority=9), timeout=120)
    assert next(running).delta.token_ids  # holds the only sequence slot
    times: dict = {}
    readers = []
    for name, prompt, priority in (("late", "The built-in function", 5), ("urgent", "A list comprehension", -3)):
        call = stub.Generate(pb.GenerateRequest(request_id=name, prompt=prompt, sampling=SHORT, priority=priority),
                             timeout=120)
        readers.append(_timed(call, times, name))
        wait_until(lambda: _handed_to_the_engine(priority_stack, name))  # arrived in this order
    running.cancel()
    for r in readers:
        r.join(120)
    assert times[("urgent", "done")] < times[("late", "first")]  # one slot: the urgent one ran first, whole
    assert_no_leak(priority_stack.address)
    with openai_on_gateway(priority_stack.address) as api:  # vLLM's field, forwarded by the gateway
        got = api.completions.create(model="zeroc-tiny", prompt="x", max_tokens=2, extra_body={"priority": -1})
        assert got.usage.completion_tokens == 2


def test_an_fcfs_service_refuses_a_priority_and_keeps_serving(services):
    with pytest.raises(grpc.RpcError) as err:
        list(_stub(services.decode).Generate(pb.GenerateRequest(prompt="x", priority=1), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--scheduling-policy priority" in err.value.details()
    with openai_on_gateway(services.colocated) as api:
        with pytest.raises(openai.BadRequestError, match="scheduling-policy"):
            api.completions.create(model="zeroc-tiny", prompt="x", max_tokens=2, extra_body={"priority": 1})
        assert api.completions.create(model="zeroc-tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert_no_leak(services.decode)
