"""The prefill service over real gRPC, and a decode service fed through a faulty link to it."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from zeroc.client import Client, ClientError, RetryPolicy
from zeroc.kv_transfer import decode_chunk
from zeroc.stack import ServiceProcess
from zeroc.v1 import prefill_pb2, prefill_pb2_grpc


def prefill_stub(target: str) -> prefill_pb2_grpc.PrefillServiceStub:
    return prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(target))


def test_prefill_streams_checked_chunks_then_a_summary(services, bundled):
    ids = bundled.tokenizer.encode("import os\nprint(os.getcwd())")
    replies = list(prefill_stub(services.prefill).Prefill(
        prefill_pb2.PrefillRequest(token_ids=ids, max_chunk_bytes=1024), timeout=60))
    chunks, summary = [r.chunk for r in replies[:-1]], replies[-1].summary
    assert all(r.HasField("chunk") for r in replies[:-1]) and replies[-1].HasField("summary")
    assert all(len(c.data) <= 1024 for c in chunks)
    pieces = [decode_chunk(c) for c in chunks]
    cfg = bundled.config
    assert summary.num_tokens == len(ids) and summary.num_layers == cfg.num_hidden_layers
    assert summary.kv_bytes == sum(len(c.data) for c in chunks) == len(ids) * cfg.num_hidden_layers * 2 * \
        cfg.num_key_value_heads * cfg.head_dim * 4
    assert [p.layer for p in pieces] == sorted(p.layer for p in pieces)


@pytest.mark.parametrize("request_, code, words", [
    (prefill_pb2.PrefillRequest(token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (prefill_pb2.PrefillRequest(token_ids=[1, 99999]), grpc.StatusCode.INVALID_ARGUMENT, "token ids must be <"),
    (prefill_pb2.PrefillRequest(token_ids=[1] * 5000), grpc.StatusCode.OUT_OF_RANGE, "at most"),
    (prefill_pb2.PrefillRequest(token_ids=[1, 2], model_fingerprint="0123456789abcdef"),
     grpc.StatusCode.FAILED_PRECONDITION, "fingerprint"),
])
def test_bad_prefill_requests(services, request_, code, words):
    with pytest.raises(grpc.RpcError) as err:
        list(prefill_stub(services.prefill).Prefill(request_, timeout=60))
    assert err.value.code() == code and words in err.value.details()


class FaultyLink(prefill_pb2_grpc.PrefillServiceServicer):
    """Relays Prefill to the real prefill service, damaging the stream as `mode` says."""

    def __init__(self, target: str):
        self.upstream = prefill_stub(target)
        self.mode = "pass"

    def Prefill(self, request, context):
        if self.mode == "down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "link down")
        for i, reply in enumerate(self.upstream.Prefill(request, timeout=60)):
            if i == 1 and self.mode == "corrupt":
                data = bytearray(reply.chunk.data)
                data[0] ^= 0x40
                reply.chunk.data = bytes(data)
            if i == 1 and self.mode == "drop":
                continue
            yield reply


@pytest.fixture(scope="module")
def faulty(services):
    link = FaultyLink(services.prefill)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    prefill_pb2_grpc.add_PrefillServiceServicer_to_server(link, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    decode = None
    try:
        # Transfer errors reach the client as they are (by default a decode service would prefill
        # locally on UNAVAILABLE: tests/zeroc/test_healing.py).
        decode = ServiceProcess("decode", ["--prefill", f"127.0.0.1:{port}", "--prefill-fallback", "fail"],
                                env={"ZEROC_TRANSFER_CHUNK_BYTES": "1024"})
        decode.wait_serving()
        yield link, decode.address
    finally:
        if decode is not None:
            decode.stop()
        server.stop(0)


@pytest.mark.parametrize("mode, code, words", [
    ("corrupt", grpc.StatusCode.DATA_LOSS, "CRC32C"),
    ("drop", grpc.StatusCode.DATA_LOSS, "incomplete"),
    ("down", grpc.StatusCode.UNAVAILABLE, "link down"),
])
def test_a_damaged_transfer_fails_cleanly_and_the_decode_service_recovers(faulty, mode, code, words):
    link, target = faulty
    no_retry = RetryPolicy(attempts=1)
    with Client(target, retry=no_retry) as client:
        link.mode = mode
        with pytest.raises(ClientError) as err:
            client.generate("The built-in function returns the length of an object", max_tokens=4)
        assert err.value.code == code and words in err.value.details
        link.mode = "pass"
        ok = client.generate("The built-in function returns the length of an object", max_tokens=4,
                             ignore_eos=True)
        assert len(ok.token_ids) == 4 and ok.usage.kv_bytes_received > 0
        info = client.model_info()
        assert info.kv_blocks_free == info.kv_blocks_total


def test_a_cancelled_prefill_stream_leaves_the_service_serving(services, bundled):
    ids = bundled.tokenizer.encode("The built-in function len() returns the number of items. " * 8)
    stub = prefill_stub(services.prefill)
    call = stub.Prefill(prefill_pb2.PrefillRequest(token_ids=ids, max_chunk_bytes=1024), timeout=60)
    assert next(call).HasField("chunk")
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    replies = list(stub.Prefill(prefill_pb2.PrefillRequest(token_ids=ids[:5]), timeout=60))
    assert replies[-1].summary.num_tokens == 5


def test_the_worker_packs_the_cpu_backends_weights_before_it_sizes_its_cache(random_gqa, cpu_kernel):
    from model_copies import unfused_copy

    from prefill_service.worker import PrefillWorker
    from zeroc.config import CacheConfig, SchedulerConfig
    from zeroc.model import Linear
    from zeroc_kernels.attention import CpuBackend

    loaded = unfused_copy(random_gqa)
    loaded.model.backend = CpuBackend()
    worker = PrefillWorker(loaded, CacheConfig(16, 32), SchedulerConfig())
    try:  # no prompt has run: the packs were made up front
        assert all(m.pack.packed is not None for m in loaded.model.modules() if isinstance(m, Linear))
    finally:
        worker.stop()
