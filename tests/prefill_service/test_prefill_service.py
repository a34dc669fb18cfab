"""The prefill service over real gRPC, and a decode service fed through a faulty link to it."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch

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


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_worker_prepares_its_model_as_the_engine_does_and_ships_the_engines_kv_bits(random_gqa, backend, request):
    """Before it sizes its cache, the worker fuses Q/K/V and gate/up where the backend runs them fused, and has it
    pack the weights (the cpu backend), as a colocated Engine does (`Transformer.prepare_to_serve`), then drops the
    plain copies as the service has it do; the KV it ships for a prompt is the very bits that the Engine (which keeps
    them) writes into its own cache for that prompt. (At these
    shapes the fused and separate GEMMs also agree bit for bit, on oneDNN and on MKL: the bits alone would not
    tell a worker that skipped the fusion.)"""
    from model_copies import unfused_copy

    from prefill_service.worker import DONE, PrefillJob, PrefillWorker
    from zeroc.config import CacheConfig, SchedulerConfig
    from zeroc.engine import Engine
    from zeroc.kv_transfer import parse_prefill_response
    from zeroc.layers import Linear
    from zeroc.sampling import SamplingParams
    from zeroc_kernels.attention import select_backend

    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")  # built, or a skip without a compiler
    loaded, colocated = unfused_copy(random_gqa), unfused_copy(random_gqa)
    for copy_ in (loaded, colocated):
        copy_.model.backend = select_backend(backend, "cpu")  # triton: its interpreter, as on CI
    worker = PrefillWorker(loaded, CacheConfig(16, 32), SchedulerConfig(), release_weights=True)  # as the service
    try:  # no prompt has run: the fused GEMMs and the packs were made up front, the plain weights dropped
        model = loaded.model
        fused = [f for layer in model.model.layers for f in (layer.self_attn.qkv, layer.mlp.gate_up)]
        assert all(f is not None and (f.pack.packed is not None) == (backend == "cpu") for f in fused)
        assert all(f.pack.released == (f.weight.numel() == 0) == (backend == "cpu") for f in fused)
        parts = {id(p) for f in fused for p in f.parts}
        assert all((m.pack.packed is not None) == (backend == "cpu" and id(m) not in parts)
                   for m in model.modules() if isinstance(m, Linear))
        prompt = torch.randint(2, 500, (45,), generator=torch.Generator().manual_seed(3)).tolist()
        job = PrefillJob("r", prompt, chunk_bytes=1 << 20)
        worker.submit(job)
        shipped = {}
        while (msg := job.out.get(timeout=60)) is not DONE:
            assert not isinstance(msg, Exception), msg
            if not isinstance(piece := parse_prefill_response(msg), prefill_pb2.PrefillSummary):
                got = decode_chunk(piece)
                shipped[got.layer, got.is_key] = got.data.clone()
    finally:
        worker.stop()
    engine, written = Engine(colocated), {}
    engine.add_request(prompt, SamplingParams(max_new_tokens=1))
    with engine.cache.listening(lambda layer, _slots, k, v: written.update({(layer, True): k.clone(),
                                                                          (layer, False): v.clone()})):
        engine.step()  # the whole prompt in one step
    assert written.keys() == shipped.keys() and len(written) == 2 * model.config.num_hidden_layers
    for key, kv in written.items():
        assert torch.equal(shipped[key], kv), key
