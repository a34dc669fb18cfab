"""Hostile and malformed input against real service processes: every bad request gets a clear status
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...), never UNKNOWN or INTERNAL, and the service keeps serving."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kv_store.hashing import store_seed
from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL
from zeroc.kv_transfer import model_fingerprint
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import kv_store_pb2 as kpb
from zeroc.v1 import prefill_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GENERATE = "/zeroc.v1.GenerationService/Generate"
MODEL_INFO = "/zeroc.v1.GenerationService/GetModelInfo"
TOKENIZE = "/zeroc.v1.GenerationService/Tokenize"
PREFILL = "/zeroc.v1.PrefillService/Prefill"
FETCH = "/zeroc.v1.KvStoreService/FetchBlocks"
STREAMING = {GENERATE, PREFILL, FETCH}


def call(channel: grpc.Channel, method: str, raw: bytes, timeout: float = 30.0) -> tuple[grpc.StatusCode, str]:
    """Send `raw` (wire bytes, not necessarily a valid message) and read the whole answer."""
    try:
        if method in STREAMING:
            list(channel.unary_stream(method)(raw, timeout=timeout))
        else:
            channel.unary_unary(method)(raw, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def seed(bundled) -> str:
    return store_seed(model_fingerprint(BUNDLED_MODEL), bundled.config, "float32", 16)


def gen(**fields) -> bytes:
    sampling = fields.pop("sampling", {})
    return pb.GenerateRequest(prompt=fields.pop("prompt", "Hello"), sampling=pb.SamplingParams(**sampling),
                              **fields).SerializeToString()


def test_crafted_requests_from_the_field_get_clear_statuses(services, seed):
    with grpc.insecure_channel(services.decode) as dec, grpc.insecure_channel(services.prefill) as pre:
        # A subnormal temperature (softmax overflow) and NaN are refused; 0 stays greedy.
        for t in (1e-45, 1e-4, float("nan"), float("inf"), -1.0):
            code, details = call(dec, GENERATE, gen(sampling={"temperature": t, "max_tokens": 1}))
            assert code == INVALID and "temperature" in details, (t, code, details)
        assert call(dec, GENERATE, gen(sampling={"temperature": 1e-3, "max_tokens": 1}))[0] == grpc.StatusCode.OK
        # Unknown enum value (proto3 keeps it as an int).
        code, details = call(pre, PREFILL, prefill_pb2.PrefillRequest(token_ids=[5, 6, 7], transport=99)
                             .SerializeToString())
        assert code == INVALID and "transport" in details
        # Invalid UTF-8 (a lone surrogate as a JS client encodes it) in a string field.
        lone = b"\xed\xa0\x80"
        for channel, method, raw in ((dec, GENERATE, b"\x0a" + bytes([len(lone)]) + lone),
                                     (dec, TOKENIZE, b"\x0a" + bytes([len(lone)]) + lone),
                                     (pre, PREFILL, b"\x0a" + bytes([len(lone)]) + lone),
                                     (pre, FETCH, b"\x12" + bytes([len(lone)]) + lone)):
            code, details = call(channel, method, raw)
            assert code == INVALID and "parse" in details, (method, code, details)
        # Oversized caller strings: refused, and not echoed back.
        for field in ("request_id", "model"):
            code, details = call(dec, GENERATE, gen(**{field: "x" * (1 << 20)}))
            assert code == INVALID and field in details and len(details) < 200, (field, code)
        code, details = call(dec, GENERATE, gen(model="y" * 200))
        assert code == grpc.StatusCode.NOT_FOUND and len(details) < 300 and "y" * 65 not in details
        code, details = call(dec, GENERATE, gen(sampling={"stop": ["a"] * 17}))
        assert code == INVALID and "stop" in details
        code, _ = call(dec, GENERATE, gen(sampling={"stop": ["a" * 1000]}))
        assert code == INVALID


def test_fetch_blocks_is_bounded_and_never_reveals_the_seed(services, seed):
    with grpc.insecure_channel(services.decode) as dec:
        def fetch(**fields) -> tuple[grpc.StatusCode, str]:
            return call(dec, FETCH, kpb.FetchBlocksRequest(seed=seed, **fields).SerializeToString())

        code, details = fetch(block_ids=["a" * 32] * 5000)  # one id repeated: was 170 KB in, 492 MB out
        assert code == INVALID
        code, details = fetch(block_ids=["ab" * 16, "ab" * 16])
        assert code == INVALID and "repeats" in details
        code, details = fetch(block_ids=[f"{i:032x}" for i in range(5000)])
        assert code == INVALID and "4096" in details
        code, details = fetch(block_ids=["0" * 32], first_token=2 ** 32 - 5)  # uint32 overflow of positions
        assert code == INVALID and "first_token" in details
        code, details = fetch(block_ids=["Z" * 32])
        assert code == INVALID
        code, details = call(dec, FETCH, kpb.FetchBlocksRequest(seed="guess", block_ids=["0" * 32])
                             .SerializeToString())
        assert code == grpc.StatusCode.FAILED_PRECONDITION and seed not in details and "guess" not in details


# -- fuzzing ----------------------------------------------------------------------------------------------

_INTS = [0, 1, 2, 3, 15, 16, 17, 255, 4095, 4096, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
_FLOATS = [0.0, -0.0, 1e-45, 1e-3, 0.5, 1.0, 2.0, 100.0, 101.0, -1.0, float("nan"), float("inf"), float("-inf")]
_STRINGS = ["", "a", "Hello", "é", "\u2028", "x" * 300, "\x00", "日本語", "0" * 32]


def _structured(rng: random.Random, seed: str) -> tuple[str, bytes]:
    """A request of a random method with fields drawn from edge values (valid ones keep the work small)."""
    kind = rng.choice([GENERATE, GENERATE, PREFILL, FETCH, TOKENIZE, MODEL_INFO])
    if kind == GENERATE:
        limit = rng.choice([0, 1, 2, 2 ** 32 - 1]) if rng.random() < 0.3 else rng.choice([1, 2])
        s = pb.SamplingParams(max_tokens=limit,
                              temperature=rng.choice(_FLOATS), top_k=rng.choice(_INTS), top_p=rng.choice(_FLOATS),
                              stop=[rng.choice(_STRINGS) for _ in range(rng.choice([0, 1, 2, 20]))],
                              stop_token_ids=[rng.choice(_INTS) for _ in range(rng.choice([0, 1, 3]))],
                              ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:
            s.seed = rng.choice([0, 1, 2 ** 63, 2 ** 64 - 1])
        if rng.random() < 0.25:  # log-probabilities, penalties and logit bias: edge values, mostly valid
            s.logprobs = rng.choice([0, 1, 5, 20, 21, 2 ** 32 - 1])
            s.frequency_penalty, s.presence_penalty = rng.choice(_FLOATS), rng.choice([0.0, 0.5, -2.0])
            s.repetition_penalty = rng.choice(_FLOATS)
            s.logit_bias.update({rng.choice(_INTS): rng.choice(_FLOATS) for _ in range(rng.choice([0, 1, 3]))})
        if rng.random() < 0.15:  # prompt log-probabilities: the prompt computed whole on the decode service
            s.prompt_logprobs = rng.choice([0, 2, 20, 21, 2 ** 32 - 1])
        req = pb.GenerateRequest(request_id=rng.choice(_STRINGS), model=rng.choice(["", "x" * 300, "tiny"]),
                                 sampling=s)
        if rng.random() < 0.5:
            req.prompt = rng.choice(_STRINGS)
        else:
            req.prompt_token_ids.extend(rng.choice(_INTS) for _ in range(rng.choice([0, 1, 5, 40])))
        return kind, req.SerializeToString()
    if kind == PREFILL:
        req = prefill_pb2.PrefillRequest(
            request_id=rng.choice(_STRINGS),
            token_ids=[rng.choice(_INTS[:8]) for _ in range(rng.choice([0, 1, 4, 33]))],
            model_fingerprint=rng.choice(["", "x" * 300]), max_chunk_bytes=rng.choice(_INTS),
            cached_prefix_tokens=rng.choice(_INTS), transport=rng.choice([0, 1, 2, 3, 4, 99, 2 ** 31 - 1]),
            link_id=rng.choice(_STRINGS))
        return kind, req.SerializeToString()
    if kind == FETCH:
        ids = [rng.choice(["0" * 32, "f" * 32, "a" * 31, "A" * 32, ""]) for _ in range(rng.choice([0, 1, 3, 50]))]
        req = kpb.FetchBlocksRequest(block_ids=ids, seed=rng.choice([seed, seed, "", "x" * 300]),
                                     first_token=rng.choice(_INTS), max_chunk_bytes=rng.choice(_INTS))
        return kind, req.SerializeToString()
    if kind == TOKENIZE:
        return kind, pb.TokenizeRequest(text=rng.choice(_STRINGS), add_special_tokens=rng.random() < 0.5
                                        ).SerializeToString()
    return kind, b""


def _mutated(rng: random.Random, seed: str) -> tuple[str, bytes]:
    """A structured request with random bytes flipped, inserted, dropped or the message cut short."""
    kind, raw = _structured(rng, seed)
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(data))
        if op < 0.4 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op < 0.7:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif op < 0.85:
            del data[pos:pos + rng.randint(1, 4)]
        else:
            data = data[:pos]
    return kind, bytes(data)


def test_fuzzed_requests_never_get_unknown_or_internal_and_the_service_answers_afterwards(services, seed):
    with Client(services.decode) as c:
        before = c.generate("The built-in function", max_tokens=6, ignore_eos=True)
    rng = random.Random(20261204)
    cases = [(_structured if i % 2 else _mutated)(rng, seed) for i in range(2400)]
    targets = {GENERATE: services.decode, TOKENIZE: services.colocated, MODEL_INFO: services.decode,
               PREFILL: services.prefill, FETCH: services.decode}
    channels = {t: grpc.insecure_channel(t) for t in set(targets.values())}
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda kc: (kc[0], *call(channels[targets[kc[0]]], kc[0], kc[1], 5.0)), cases))
    finally:
        for ch in channels.values():
            ch.close()
    counts: dict[str, int] = {}
    for _, code, _ in results:
        counts[code.name] = counts.get(code.name, 0) + 1
    bad = [(m, code.name, d[:120]) for m, code, d in results
           if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)]
    print(f"fuzz: {len(results)} calls in {time.monotonic() - started:.1f}s: {counts}")
    assert not bad, bad[:10]
    assert counts.get("OK", 0) > 100 and counts.get("INVALID_ARGUMENT", 0) > 500, counts
    with Client(services.decode) as c:
        after = c.generate("The built-in function", max_tokens=6, ignore_eos=True)
        assert after.token_ids == before.token_ids
