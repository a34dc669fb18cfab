"""KV transfer in-process: the chunk format, CRC checks, and prefill -> receive -> decode equals direct."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError

from prefill_service.worker import DONE, PrefillJob, PrefillWorker
from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.kv_transfer import (KvReceiver, KvTransferError, WireChunk, decode_chunk, encode_layer, encode_layer_wire,
                               parse_prefill_response)
from zeroc.sampling import SamplingParams
from zeroc.v1 import prefill_pb2


def test_chunks_round_trip_within_the_byte_bound():
    k, v = torch.randn(37, 2, 32), torch.randn(37, 2, 16)
    chunks = list(encode_layer(3, k, v, first_token=5, max_bytes=1024))
    assert all(len(c.data) <= 1024 for c in chunks)
    pieces = [decode_chunk(c) for c in chunks]
    assert {p.layer for p in pieces} == {3}
    keys = torch.cat([p.data for p in pieces if p.is_key])
    values = torch.cat([p.data for p in pieces if not p.is_key])
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert [p.first_token for p in pieces if p.is_key] == list(range(5, 5 + 37, 1024 // (2 * 32 * 4)))


def test_bfloat16_round_trips_bit_exactly():
    k = torch.randn(4, 1, 8).to(torch.bfloat16)
    (ck, cv) = encode_layer(0, k, k, 0, 1 << 20)
    assert ck.dtype == "bfloat16" and torch.equal(decode_chunk(ck).data, k)


def test_a_flipped_byte_fails_the_crc_with_data_loss():
    chunk = next(encode_layer(0, torch.randn(4, 1, 8), torch.randn(4, 1, 8), 0, 1 << 20))
    data = bytearray(chunk.data)
    data[7] ^= 0x01
    chunk.data = bytes(data)
    with pytest.raises(KvTransferError, match="CRC32C") as err:
        decode_chunk(chunk)
    assert err.value.code == grpc.StatusCode.DATA_LOSS


def test_metadata_that_disagrees_with_the_payload_is_data_loss():
    chunk = next(encode_layer(0, torch.randn(4, 1, 8), torch.randn(4, 1, 8), 0, 1 << 20))
    chunk.shape[:] = [5, 1, 8]
    with pytest.raises(KvTransferError, match="bytes but shape") as err:
        decode_chunk(chunk)
    assert err.value.code == grpc.StatusCode.DATA_LOSS


def test_the_wire_encoding_is_standard_protobuf_and_parses_to_the_same_chunks():
    k, v = torch.randn(37, 2, 32).to(torch.bfloat16), torch.randn(37, 2, 16).to(torch.bfloat16)
    wires = list(encode_layer_wire(3, k, v, first_token=5, max_bytes=1024))
    messages = list(encode_layer(3, k, v, first_token=5, max_bytes=1024))
    assert [prefill_pb2.PrefillResponse.FromString(w).chunk for w in wires] == messages
    parsed = [parse_prefill_response(w) for w in wires]
    assert all(isinstance(p, WireChunk) for p in parsed)
    assert [p.header.crc32c for p in parsed] == [m.crc32c for m in messages]
    for got, want in zip(map(decode_chunk, parsed), map(decode_chunk, messages)):
        assert (got.layer, got.is_key, got.first_token) == (want.layer, want.is_key, want.first_token)
        assert torch.equal(got.data, want.data)


def test_chunks_from_any_protobuf_encoder_parse_whatever_the_field_order():
    chunk = next(encode_layer(1, torch.randn(2, 1, 8), torch.randn(2, 1, 8), 2, 1 << 20))
    standard = prefill_pb2.PrefillResponse(chunk=chunk).SerializeToString()  # data before crc32c
    # Serialized messages concatenate as a merge: the payload first, the metadata in two later runs.
    inner = b"".join(prefill_pb2.KvChunk(**fields).SerializeToString() for fields in (
        {"data": chunk.data}, {"crc32c": chunk.crc32c, "shape": chunk.shape, "layer": 1},
        {"dtype": chunk.dtype, "tensor": chunk.tensor, "first_token": 2}))
    assert len(inner) < 128  # so its length is a one-byte varint
    for raw in (standard, bytes([0x0A, len(inner)]) + inner):
        parsed = parse_prefill_response(raw)
        assert isinstance(parsed, WireChunk) and parsed.header.crc32c == chunk.crc32c
        piece = decode_chunk(parsed)
        assert (piece.layer, piece.first_token) == (1, 2) and torch.equal(piece.data, decode_chunk(chunk).data)


def test_a_summary_passes_through_and_garbage_is_a_decode_error():
    summary = prefill_pb2.PrefillSummary(num_tokens=7, num_layers=2, kv_bytes=10)
    assert parse_prefill_response(prefill_pb2.PrefillResponse(summary=summary).SerializeToString()) == summary
    with pytest.raises(DecodeError):
        parse_prefill_response(b"\x0a\xff\xff\xff\x0f garbage")


def test_a_flipped_payload_byte_on_the_wire_fails_the_crc():
    raw = bytearray(next(encode_layer_wire(0, torch.randn(4, 1, 8), torch.randn(4, 1, 8), 0, 1 << 20)))
    raw[-3] ^= 0x10  # the payload is the end of the message
    with pytest.raises(KvTransferError, match="CRC32C") as err:
        decode_chunk(parse_prefill_response(bytes(raw)))
    assert err.value.code == grpc.StatusCode.DATA_LOSS


def _prefill(loaded, ids: list[int], chunk_bytes: int) -> list:
    worker = PrefillWorker(loaded, CacheConfig(block_size=16, num_blocks=64), SchedulerConfig())
    try:
        job = PrefillJob("p", ids, chunk_bytes)
        worker.submit(job)
        out = []
        while (item := job.out.get(timeout=60)) is not DONE:
            assert not isinstance(item, Exception), item
            out.append(prefill_pb2.PrefillResponse.FromString(item).chunk)
        assert worker.cache.num_free_blocks == 64  # the prefill side keeps nothing
        return out
    finally:
        worker.stop()


def test_chunks_stream_layer_by_layer(bundled):
    ids = bundled.tokenizer.encode("def parse(text):\n    return text.split()")
    chunks = _prefill(bundled, ids, 1024)
    layers = [c.layer for c in chunks]
    assert layers == sorted(layers) and set(layers) == set(range(bundled.config.num_hidden_layers))


def test_receiving_into_a_reservation_then_decoding_equals_direct_generation(any_model):
    prompt = "The built-in function len() returns the number of items"
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    direct = Engine(any_model, CacheConfig(block_size=8, num_blocks=64)).generate([prompt], params)[0]

    engine = Engine(any_model, CacheConfig(block_size=8, num_blocks=64))
    ids = engine.prepare_prompt(prompt)
    receiver = KvReceiver(engine.cache, engine.reserve("r", len(ids) - 1))
    for chunk in _prefill(any_model, ids[:-1], 2048):
        receiver.write(decode_chunk(chunk))
    receiver.check_complete()
    engine.add_request(ids, params, "r", cached_tokens=len(ids) - 1)
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.token_ids]
    assert out == direct.token_ids
    assert engine.cache.num_free_blocks == 64


def test_a_missing_chunk_is_reported_and_abort_frees_the_reservation(bundled):
    engine = Engine(bundled, CacheConfig(block_size=8, num_blocks=32))
    ids = engine.prepare_prompt("a prompt of a few tokens")
    receiver = KvReceiver(engine.cache, engine.reserve("r", len(ids) - 1))
    assert engine.cache.num_free_blocks < 32
    for chunk in _prefill(bundled, ids[:-1], 1 << 20)[1:]:
        receiver.write(decode_chunk(chunk))
    with pytest.raises(KvTransferError, match="incomplete") as err:
        receiver.check_complete()
    assert err.value.code == grpc.StatusCode.DATA_LOSS
    engine.abort("r")
    assert engine.cache.num_free_blocks == 32


def test_a_chunk_past_the_prompt_is_rejected(bundled):
    engine = Engine(bundled, CacheConfig(block_size=8, num_blocks=32))
    receiver = KvReceiver(engine.cache, engine.reserve("r", 3))
    chunk = next(encode_layer(0, torch.randn(4, 1, 64), torch.randn(4, 1, 64), 0, 1 << 20))
    with pytest.raises(KvTransferError, match="covers tokens up to 4"):
        receiver.write(decode_chunk(chunk))


def test_a_receiver_after_a_cached_prefix_takes_prompt_positions(bundled):
    engine = Engine(bundled, CacheConfig(block_size=8, num_blocks=32))
    slots = engine.reserve("r", 12)
    receiver = KvReceiver(engine.cache, slots[8:], start=8)  # tokens 0-7 came from the KV store
    k, v = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    for chunk in encode_layer(0, k, v, 8, 1 << 20):
        receiver.write(decode_chunk(chunk))
    k_pool = engine.cache.k_pools[0]
    assert torch.equal(k_pool.view(-1, 2, 64)[slots[8:]], k)
    early = next(encode_layer(0, k, v, 0, 1 << 20))
    with pytest.raises(KvTransferError, match="covers tokens up to 4"):
        receiver.write(decode_chunk(early))
    with pytest.raises(KvTransferError, match="token 8"):
        receiver.check_complete()  # layer 1 never arrived
