"""Queue limits and SIGTERM draining, each against its own decode service process."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zeroc.client import Client
from zeroc.stack import ServiceProcess
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import generation_pb2_grpc

from service_checks import assert_no_leak, wait_until

LONG = pb.SamplingParams(max_tokens=2000, ignore_eos=True)


def stub(target: str) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(target))


@pytest.fixture
def start():
    """Start colocated decode processes; all are stopped at the end of the test."""
    procs: list[ServiceProcess] = []

    def run(*args: str, env: dict | None = None) -> ServiceProcess:
        procs.append(ServiceProcess("decode", ["--colocated", *args], env=env))
        procs[-1].wait_serving()
        return procs[-1]

    yield run
    for p in procs:
        p.stop()


def test_past_the_queue_limit_requests_get_resource_exhausted(start):
    svc = start("--max-queue", "1", env={"ZEROC_SCHEDULER_MAX_NUM_SEQS": "1"})
    running = stub(svc.address).Generate(pb.GenerateRequest(prompt="first", sampling=LONG), timeout=120)
    assert next(running).delta.token_ids
    waiting = stub(svc.address).Generate(pb.GenerateRequest(prompt="second", sampling=LONG), timeout=120)
    with Client(svc.address) as c:
        wait_until(lambda: c.model_info().requests_queued == 1)
    with pytest.raises(grpc.RpcError) as err:
        list(stub(svc.address).Generate(pb.GenerateRequest(prompt="third"), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in err.value.details()
    running.cancel()
    assert next(waiting).delta.token_ids  # the queued request runs once the first one is gone
    waiting.cancel()
    assert_no_leak(svc.address)


def _health(target: str) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(grpc.insecure_channel(target)).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return None


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(start):
    svc = start("--grace-s", "120")
    call = stub(svc.address).Generate(pb.GenerateRequest(
        prompt="drain", sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True)), timeout=300)
    tokens = list(next(call).delta.token_ids)
    svc.proc.terminate()
    wait_until(lambda: _health(svc.address) != health_pb2.HealthCheckResponse.SERVING)
    with pytest.raises(grpc.RpcError) as err:
        list(stub(svc.address).Generate(pb.GenerateRequest(prompt="late"), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(call)
    tokens += [t for m in rest if m.HasField("delta") for t in m.delta.token_ids]
    assert rest[-1].result.finish_reason == pb.FINISH_REASON_LENGTH and len(tokens) == 1500
    assert svc.proc.wait(60) == 0


def test_sigterm_cancels_what_outlives_the_grace_period(start):
    svc = start("--grace-s", "0")
    call = stub(svc.address).Generate(pb.GenerateRequest(prompt="cut", sampling=LONG), timeout=120)
    next(call)
    svc.proc.terminate()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert svc.proc.wait(60) == 0
