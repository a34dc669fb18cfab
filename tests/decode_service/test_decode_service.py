"""The decode service over real gRPC, against real service processes (the session `services` fixture)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service_checks import assert_no_leak
from zeroc.client import Client
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import SamplingParams
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import generation_pb2_grpc

PROMPTS = [
    "The built-in function",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Lists are mutable sequences, typically used to store collections of homogeneous items. " * 4,
    # Over 1,024 tokens: the services' cpu backend attends its prefill densely (the fresh-prefill path)
    "Tuples are immutable sequences, typically used to store collections of heterogeneous data. " * 70,
]


def stub(target: str) -> generation_pb2_grpc.GenerationServiceStub:
    return generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(target))


@pytest.mark.parametrize("max_tokens", [24])
def test_greedy_disaggregated_equals_colocated_equals_direct(services, bundled, max_tokens):
    engine = Engine(load_model(bundled.path, attention_backend="torch"), CacheConfig())  # the references
    assert len(engine.prepare_prompt(PROMPTS[3])) > 1024
    direct = engine.generate(PROMPTS + [[5]], SamplingParams(max_new_tokens=max_tokens, ignore_eos=True))
    with Client(services.decode) as dis, Client(services.colocated) as col:
        for prompt, want in zip(PROMPTS + [[5]], direct):
            a = dis.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
            b = col.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
            assert a.token_ids == b.token_ids == want.token_ids
            assert a.text == b.text == want.text
            assert a.finish_reason == b.finish_reason == "length"
            n = len(want.prompt_token_ids)
            assert a.usage.prompt_tokens == b.usage.prompt_tokens == n
            assert a.usage.completion_tokens == max_tokens
            # All but the last prompt token travel: layers x (K, V) x heads x head_dim x fp32.
            cfg = bundled.config
            per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
            # Prompt blocks an earlier request left in the KV store do not travel again.
            assert a.usage.kv_bytes_received == (n - 1 - a.usage.cached_prefix_tokens) * per_token
            assert b.usage.kv_bytes_received == 0
    assert_no_leak(services.decode)


def test_health_and_reflection(services):
    for target, service in ((services.decode, "zeroc.v1.GenerationService"),
                            (services.prefill, "zeroc.v1.PrefillService")):
        channel = grpc.insecure_channel(target)
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names


def test_model_info_and_tokenize(services, bundled):
    with Client(services.colocated) as c:
        info = c.model_info()
        assert (info.model, info.mode, info.num_layers) == ("zeroc-tiny", "colocated",
                                                             bundled.config.num_hidden_layers)
        assert c.tokenize("hello world") == bundled.tokenizer.encode("hello world")
    with Client(services.decode) as c:
        assert c.model_info().mode == "disaggregated"
        assert c.model_info().fingerprint == info.fingerprint


def _status(target: str, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    try:
        list(stub(target).Generate(request, timeout=60))
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


BAD = [
    ("empty prompt", pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("both prompts", pb.GenerateRequest(prompt="a", prompt_token_ids=[3]), grpc.StatusCode.INVALID_ARGUMENT,
     "not both"),
    ("token outside vocab", pb.GenerateRequest(prompt_token_ids=[3, 100000]), grpc.StatusCode.INVALID_ARGUMENT,
     "outside"),
    ("too long", pb.GenerateRequest(prompt_token_ids=[3] * 4000), grpc.StatusCode.OUT_OF_RANGE, "limit"),
    ("temperature", pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("top_p", pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(top_p=1.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("empty stop string", pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(stop=[""])),
     grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ("unknown model", pb.GenerateRequest(prompt="a", model="llama-405b"), grpc.StatusCode.NOT_FOUND,
     "unknown model"),
]


@pytest.mark.parametrize("mode", ["decode", "colocated"])
def test_bad_requests_get_the_right_status_and_the_service_keeps_serving(services, mode):
    target = getattr(services, mode)
    for name, request, code, words in BAD:
        got, details = _status(target, request)
        assert got == code, f"{name}: {got} {details}"
        assert words in details, f"{name}: {details}"
    with Client(target) as c:
        assert c.generate("still serving", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
    assert_no_leak(target)


def test_oversized_and_garbage_messages(services):
    code, details = _status(services.colocated, pb.GenerateRequest(prompt="x" * (2 << 20)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    raw = grpc.insecure_channel(services.colocated).unary_stream(
        "/zeroc.v1.GenerationService/Generate", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(b"\xff\xff\xff\xff garbage", timeout=30))
    # A request protobuf cannot parse is the caller's fault (grpc alone would answer INTERNAL).
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parse" in err.value.details()
    with Client(services.colocated) as c:
        assert c.generate("after garbage", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    assert_no_leak(services.colocated)


def test_32_concurrent_streaming_clients(services, bundled):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(32)]
    want = Engine(bundled, CacheConfig()).generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))

    def run(prompt: str) -> list[int]:
        with Client(services.decode) as c:
            return [t for item in c.stream(prompt, max_tokens=16, ignore_eos=True)
                    for t in getattr(item, "token_ids", [])]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, prompts))
    assert got == [w.token_ids for w in want]
    assert_no_leak(services.decode)


@pytest.mark.parametrize("mode", ["decode", "colocated"])
def test_cancelling_mid_stream_frees_the_blocks(services, mode):
    target = getattr(services, mode)
    call = stub(target).Generate(pb.GenerateRequest(
        prompt=PROMPTS[2], sampling=pb.SamplingParams(max_tokens=2000, ignore_eos=True)), timeout=120)
    first = next(call)  # a long deadline: the request must still be running when we look, however slow the host
    assert first.delta.token_ids
    with Client(target) as c:
        info = c.model_info()
        assert info.kv_blocks_free < info.kv_blocks_total and info.requests_running == 1
    call.cancel()
    assert_no_leak(target)


def test_an_expired_deadline_frees_the_blocks(services):
    call = stub(services.decode).Generate(pb.GenerateRequest(
        prompt=PROMPTS[1], sampling=pb.SamplingParams(max_tokens=2000, ignore_eos=True)), timeout=0.5)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_leak(services.decode)
