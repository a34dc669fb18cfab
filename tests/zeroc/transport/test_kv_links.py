"""Negotiation, fallback and NCCL link setup over real gRPC, on a CPU machine.

A real CPU prefill service (the session's `services`) must advertise gRPC only and refuse
out-of-band requests cleanly. The id exchange runs against the real prefill-side servicer and the
real libnccl: the unique id travels, both sides try to join, and without a GPU the request fails
with NCCL's own message instead of hanging; a peer that never answers hits the deadline.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from prefill_service.server import PrefillServicer
from prefill_service.worker import PrefillWorker
from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.kv_transfer import KvReceiver, KvTransferError, add_prefill_service, model_fingerprint
from zeroc.transport.capability import CUDA_IPC, GRPC, NCCL, Capability, host_id
from zeroc.transport.decode_side import NcclKvTransport, NegotiatingKvTransport
from zeroc.transport.prefill_side import KvTransportService
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the no-CUDA outcomes (NCCL cannot come up, auto falls back to gRPC); on a GPU benchmarks/gpu_nccl.py checks the real links")
GPU_HERE = Capability(cuda=True, device_uuid="GPU-decode", host_id=host_id(), nccl_version="2.32.3",
                      transports=(GRPC, CUDA_IPC, NCCL))
FINGERPRINT = model_fingerprint(BUNDLED_MODEL)
MB = 1 << 20


def stub(target: str) -> prefill_pb2_grpc.PrefillServiceStub:
    return prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(target))


def test_a_cpu_prefill_service_offers_grpc_only(services):
    cap = stub(services.prefill).GetKvCapability(prefill_pb2.GetKvCapabilityRequest(
        capability=GPU_HERE.to_proto()), timeout=30).capability
    assert not cap.cuda and list(cap.transports) == [prefill_pb2.KV_TRANSPORT_KIND_GRPC]
    assert "cpu" in cap.why_not and cap.host_id == host_id()


@pytest.mark.parametrize("request_", [
    prefill_pb2.PrefillRequest(token_ids=[1, 2, 3], transport=prefill_pb2.KV_TRANSPORT_KIND_NCCL, link_id="x"),
    prefill_pb2.PrefillRequest(token_ids=[1, 2, 3], transport=prefill_pb2.KV_TRANSPORT_KIND_CUDA_IPC),
])
def test_a_cpu_prefill_service_refuses_out_of_band_kv_and_keeps_serving(services, request_):
    s = stub(services.prefill)
    with pytest.raises(grpc.RpcError) as err:
        list(s.Prefill(request_, timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not offer" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(s.OpenKvLink(prefill_pb2.OpenKvLinkRequest(link_id="l", nccl_unique_id=bytes(128)), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not offer NCCL" in err.value.details()
    replies = list(s.Prefill(prefill_pb2.PrefillRequest(token_ids=[1, 2, 3]), timeout=60))
    assert replies[-1].summary.num_tokens == 3


def _negotiating(target: str, setting: str) -> NegotiatingKvTransport:
    return NegotiatingKvTransport(target, FINGERPRINT, 4096, 16 * MB, setting, GPU_HERE, torch.device("cpu"), None)


def test_auto_falls_back_to_grpc_with_a_cpu_peer_and_the_kv_arrives(services, bundled):
    transport = _negotiating(services.prefill, "auto")
    try:
        engine = Engine(bundled, CacheConfig(block_size=8, num_blocks=32))
        ids = engine.prepare_prompt("The built-in function len() returns")
        receiver = KvReceiver(engine.cache, engine.reserve("r", len(ids) - 1))
        got = transport.fetch("r", ids[:-1], receiver, 60, lambda: True)
        assert transport.kind == GRPC
        cfg = bundled.config
        assert got == (len(ids) - 1) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    finally:
        transport.close()


def test_demanding_nccl_of_a_cpu_peer_fails_the_request_not_the_service(services, bundled):
    transport = _negotiating(services.prefill, "nccl")
    try:
        engine = Engine(bundled, CacheConfig(block_size=8, num_blocks=32))
        receiver = KvReceiver(engine.cache, engine.reserve("r", 3))
        with pytest.raises(KvTransferError) as err:
            transport.fetch("r", [1, 2, 3], receiver, 60, lambda: True)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot receive KV over NCCL" in str(err.value) and "runs on cpu" in str(err.value)
    finally:
        transport.close()


class _Server:
    """A real gRPC server on loopback for one servicer."""

    def __init__(self, servicer):
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        add_prefill_service(servicer, self.server)  # as the prefill service registers it
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def nccl_prefill(lib, bundled):
    """The real prefill servicer and worker, told their model is on a GPU, with the real libnccl."""
    cap = Capability(cuda=True, device_uuid="GPU-prefill", host_id="elsewhere", nccl_version=str(lib.version),
                     transports=(GRPC, CUDA_IPC, NCCL))
    kv = KvTransportService(cap, torch.device("cuda:0"), lib, threading.Event())
    servicer = PrefillServicer(4, 4096, threading.Event(), kv, 30.0)
    worker = PrefillWorker(bundled, CacheConfig(block_size=16, num_blocks=64), SchedulerConfig())
    servicer.attach(bundled, worker, FINGERPRINT)
    server = _Server(servicer)
    yield server.target, kv
    server.stop()
    worker.stop()
    kv.close()


def test_auto_falls_back_to_grpc_when_the_nccl_link_cannot_come_up(nccl_prefill, lib, bundled):
    target, _ = nccl_prefill
    transport = NegotiatingKvTransport(target, FINGERPRINT, 4096, 16 * MB, "auto", GPU_HERE, torch.device("cuda:0"),
                                       lib)
    try:
        assert transport.negotiate(30)[0] == NCCL  # both sides claim GPUs: NCCL is tried first
        engine = Engine(bundled, CacheConfig(block_size=8, num_blocks=32))
        ids = engine.prepare_prompt("A list comprehension")
        receiver = KvReceiver(engine.cache, engine.reserve("r", len(ids) - 1))
        assert transport.fetch("r", ids[:-1], receiver, 60, lambda: True) > 0
        assert transport.kind == GRPC
    finally:
        transport.close()


def test_link_setup_sends_the_unique_id_and_fails_with_nccls_message_without_a_gpu(nccl_prefill, lib):
    target, kv = nccl_prefill
    transport = NcclKvTransport(target, FINGERPRINT, 4096, 16 * MB, torch.device("cuda:0"), lib)
    try:
        with pytest.raises(KvTransferError) as err:
            transport.fetch("r", [1, 2, 3], None, 30, lambda: True)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "unhandled cuda error" in str(err.value)
    finally:
        transport.close()
    deadline = time.monotonic() + 10
    while kv.open_links and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv.open_links == 0  # nothing half-open is left on the prefill side


@pytest.mark.parametrize("request_, code, words", [
    (prefill_pb2.OpenKvLinkRequest(link_id="a", nccl_unique_id=b"short"), grpc.StatusCode.INVALID_ARGUMENT,
     "128"),
    (prefill_pb2.OpenKvLinkRequest(link_id="", nccl_unique_id=bytes(128)), grpc.StatusCode.INVALID_ARGUMENT,
     "link_id"),
    (prefill_pb2.OpenKvLinkRequest(link_id="a", nccl_unique_id=bytes(128), model_fingerprint="0123456789abcdef"),
     grpc.StatusCode.FAILED_PRECONDITION, "fingerprint"),
])
def test_bad_link_requests(nccl_prefill, request_, code, words):
    target, _ = nccl_prefill
    with pytest.raises(grpc.RpcError) as err:
        list(stub(target).OpenKvLink(request_, timeout=30))
    assert err.value.code() == code and words in err.value.details()


def test_a_prefill_request_on_an_unknown_link_is_refused(nccl_prefill):
    _, kv = nccl_prefill
    request = prefill_pb2.PrefillRequest(token_ids=[1, 2], transport=prefill_pb2.KV_TRANSPORT_KIND_NCCL,
                                         link_id="never-opened")
    with pytest.raises(KvTransferError) as err:
        kv.sink_for(request)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "never-opened" in str(err.value)
    assert kv.sink_for(prefill_pb2.PrefillRequest(token_ids=[1, 2])) is None  # in-band needs no sink


class _SilentPeer(prefill_pb2_grpc.PrefillServiceServicer):
    """A prefill peer that takes the link request and never answers (a hung GPU side)."""

    def __init__(self):
        self.requests: list[prefill_pb2.OpenKvLinkRequest] = []
        self.ended = threading.Event()

    def OpenKvLink(self, request, context):
        self.requests.append(request)
        context.add_callback(self.ended.set)
        while context.is_active():
            time.sleep(0.05)
        return
        yield  # a generator: a server stream


def test_a_peer_that_never_answers_hits_the_deadline_instead_of_hanging(lib):
    peer = _SilentPeer()
    server = _Server(peer)
    transport = NcclKvTransport(server.target, FINGERPRINT, 4096, 16 * MB, torch.device("cuda:0"), lib)
    try:
        started = time.monotonic()
        with pytest.raises(KvTransferError) as err:
            transport.fetch("r", [1, 2, 3], None, 1.5, lambda: True)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "KV_LINK_STATE_ACCEPTED" in str(err.value)
        assert time.monotonic() - started < 10
        assert peer.ended.wait(10)  # the link call was cancelled, so the peer can let go too
        (request,) = peer.requests
        assert len(request.nccl_unique_id) == 128 and request.model_fingerprint == FINGERPRINT
        assert 0 < request.timeout_ms <= 1500 and len(request.link_id) == 32
    finally:
        transport.close()
        server.stop()
