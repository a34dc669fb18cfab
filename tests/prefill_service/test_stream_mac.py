"""The prefill stream's KV carries MACs: a real decode service, pointed at a real prefill service through a
gRPC relay in this process, answers exactly (as the model computes) while the relay passes chunks on as
they are, and refuses the request with DATA_LOSS when the relay alters a byte of a chunk and recomputes its
CRC, or strips the MAC; it neither keeps nor republishes the refused KV, and answers correctly afterwards."""

from __future__ import annotations

import itertools
import os
from concurrent import futures

import google_crc32c
import grpc
import pytest
import torch

from zeroc.client import Client, ClientError
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.kv_transfer import PREFILL_METHOD, KvTransferError, decode_chunk, encode_layer
from zeroc.sampling import SamplingParams
from zeroc.stack import ServiceProcess
from zeroc.stream_mac import request_key
from zeroc.v1 import prefill_pb2

_prompts = itertools.count()


def fresh_prompt() -> list[int]:
    """A prompt no earlier request shares a block with: its KV must come from the prefill service."""
    n = next(_prompts)
    return [300 + 37 * n + i for i in range(35)]


class Relay:
    """A Prefill relay between the decode and the prefill service; `mode` says what it does to the chunks."""

    def __init__(self, upstream: str):
        self.mode = "pass"
        self.chunks_altered = 0
        self._upstream = grpc.insecure_channel(upstream, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._prefill = self._upstream.unary_stream(PREFILL_METHOD)  # bytes in, bytes out
        self.server = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.max_send_message_length", 64 << 20)])
        identity = lambda b: b  # noqa: E731
        handler = grpc.unary_stream_rpc_method_handler(self._relay, identity, identity)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "zeroc.v1.PrefillService", {"Prefill": handler}),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _relay(self, raw: bytes, context):
        for reply in self._prefill(raw, timeout=context.time_remaining()):
            msg = prefill_pb2.PrefillResponse.FromString(reply)
            if msg.HasField("chunk") and self.mode != "pass":
                yield self._alter(msg).SerializeToString()
            else:
                yield reply

    def _alter(self, msg: prefill_pb2.PrefillResponse) -> prefill_pb2.PrefillResponse:
        chunk = msg.chunk
        if self.mode == "flip":  # one bit of the payload, with a CRC that matches the altered bytes
            data = bytearray(chunk.data)
            data[len(data) // 2] ^= 0x01
            chunk.data = bytes(data)
            chunk.crc32c = google_crc32c.value(chunk.data)
        else:  # "strip": as from a prefill service without the cluster key
            chunk.ClearField("mac")
        self.chunks_altered += 1
        return msg

    def close(self) -> None:
        self.server.stop(0)
        self._upstream.close()


@pytest.fixture(scope="module")
def relayed(embedded_redis):
    env = {"ZEROC_REDIS_URL": embedded_redis.url, "ZEROC_STORE_NAMESPACE": "stream-mac"}
    prefill = ServiceProcess("prefill", [], env=env)
    relay = Relay(prefill.address)
    decode = ServiceProcess("decode", ["--prefill", relay.address, "--kv-transport", "grpc"], env=env)
    try:
        prefill.wait_serving()
        decode.wait_serving()
        yield relay, decode
    finally:
        decode.stop()
        relay.close()
        prefill.stop()


def test_chunks_are_used_as_sent_and_refused_once_altered(relayed, bundled):
    relay, decode = relayed
    engine = Engine(bundled, CacheConfig())

    def expected(prompt: list[int]) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids

    with Client(decode.address, timeout=120) as c:
        prompt = fresh_prompt()
        got = c.generate(prompt, max_tokens=4, ignore_eos=True)
        assert got.token_ids == expected(prompt) and got.usage.kv_bytes_received > 0  # through the relay, verified
        held = c.model_info().kv_store.blocks_held
        for mode in ("flip", "strip"):
            relay.mode = mode
            before = relay.chunks_altered
            with pytest.raises(ClientError) as err:
                c.generate(fresh_prompt(), max_tokens=4, ignore_eos=True)
            assert err.value.code == grpc.StatusCode.DATA_LOSS, err.value
            assert ("failed its MAC check" if mode == "flip" else "carries no MAC") in str(err.value)
            assert relay.chunks_altered > before
        assert c.model_info().kv_store.blocks_held == held  # nothing of the refused requests was kept
        relay.mode = "pass"
        prompt = fresh_prompt()
        got = c.generate(prompt, max_tokens=4, ignore_eos=True)
        assert got.token_ids == expected(prompt) and got.usage.kv_bytes_received > 0


def test_a_chunk_verifies_only_for_its_request_and_header():
    stream = os.urandom(32)
    key = request_key(stream, "r1", [5, 6, 7], 0)
    (chunk, _) = encode_layer(2, torch.randn(3, 1, 8), torch.randn(3, 1, 8), 0, 1 << 20, mac_key=key)
    assert len(chunk.mac) == 16 and decode_chunk(chunk, key).layer == 2
    decode_chunk(chunk)  # without a key only the CRC is checked
    others = [request_key(stream, "r2", [5, 6, 7], 0), request_key(stream, "r1", [5, 6, 8], 0),
              request_key(stream, "r1", [5, 6, 7], 1), request_key(os.urandom(32), "r1", [5, 6, 7], 0)]
    for other in others:  # another request id, prompt, cached prefix, or deployment
        with pytest.raises(KvTransferError, match="MAC check"):
            decode_chunk(chunk, other)
    moved = prefill_pb2.KvChunk()
    moved.CopyFrom(chunk)
    moved.layer = 3  # the same bytes claimed for another layer
    with pytest.raises(KvTransferError, match="MAC check") as err:
        decode_chunk(moved, key)
    assert err.value.code == grpc.StatusCode.DATA_LOSS
