"""Every bad request gets OpenAI's error shape and the matching status, never a 5xx (but 503 for no replica)."""

from __future__ import annotations

import http.client
import json
import random

import grpc
import pytest

from zeroc.gateway.errors import from_grpc
from zeroc.stack import ServiceProcess

from gateway_support import start_gateway


def assert_error(status: int, body, want_status: int, *words: str, code: str | None = None) -> None:
    assert status == want_status, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert all(w in body["error"]["message"] for w in words), body
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.mark.parametrize("body, status, words, param", [
    ("{", 400, ["not valid JSON"], None),
    ("[1, 2]", 400, ["JSON object"], None),
    ('{"prompt": "x", "temperature": NaN}', 400, ["NaN is not a JSON value"], None),
    ({"model": "zeroc-tiny"}, 400, ["prompt", "required"], "prompt"),
    ({"prompt": "x", "n": 17}, 400, ["n", "16"], "n"),
    ({"prompt": "x", "n": 0}, 400, ["n"], "n"),
    ({"prompt": "x", "temperature": "hot"}, 400, ["temperature"], "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, ["top_p"], "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, ["max_tokens"], "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, 400, ["logprobs", "20"], "logprobs"),
    ({"prompt": "x", "suffix": "y"}, 400, ["suffix", "not supported"], "suffix"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, 400, ["max_tokens"], "max_tokens"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, ["frequency_penalty"], "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, ["repetition_penalty"], "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"five": 1.0}}, 400, ["logit_bias", "token ids"], "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 250}}, 400, ["logit_bias", "100"], "logit_bias"),
    ({"prompt": "x", "logit_bias": {"999999": 1}}, 400, ["logit_bias", "outside"], None),  # the decode service's
    ({"prompt": "x", "tools": [{"type": "function"}]}, 400, ["tools", "not supported"], "tools"),
    ({"prompt": ["a"] * 5, "n": 13}, 400, ["5 prompts", "64"], "prompt"),
    ({"prompt": [[1, 2], []]}, 400, ["token ids"], "prompt"),
    ({"prompt": [1, 99999]}, 400, ["outside"], None),  # from the decode service: INVALID_ARGUMENT
    ({"prompt": "", "max_tokens": 1}, 400, ["empty"], "prompt"),
    ({"prompt": "x", "stop": [""]}, 400, ["stop"], "stop"),
    ({"prompt": "x", "min_p": 2}, 400, ["min_p"], "min_p"),
    ({"prompt": "x", "stop_token_ids": [-1]}, 400, ["stop_token_ids"], "stop_token_ids.0"),
    ({"prompt": "x", "use_beam_search": True}, 400, ["use_beam_search", "not supported"], "use_beam_search"),
    ({"prompt": "x", "bad_words": ["no"]}, 400, ["bad_words", "not supported"], "bad_words"),
    ({"prompt": "x", "allowed_token_ids": [5]}, 400, ["allowed_token_ids", "not supported"], "allowed_token_ids"),
    ({"prompt": "x", "truncate_prompt_tokens": 8}, 400, ["truncate_prompt_tokens", "not supported"],
     "truncate_prompt_tokens"),
])
def test_invalid_completion_bodies_are_400(gateway, body, status, words, param):
    got_status, got = gateway.post("/v1/completions", body)
    assert_error(got_status, got, status, *words)
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["param"] == param


def test_error_statuses(gateway):
    status, body = gateway.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert_error(status, body, 404, "gpt-4", code="model_not_found")
    status, body = gateway.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert_error(status, body, 400, "messages.0.role")
    status, body = gateway.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert_error(status, body, 400, "only text parts")
    # Too long for the context: token ids checked here, text by the decode service (OUT_OF_RANGE).
    status, body = gateway.post("/v1/completions", {"prompt": [5] * 3000})
    assert_error(status, body, 400, "3000 tokens", code="context_length_exceeded")
    status, body = gateway.post("/v1/completions", {"prompt": "word " * 3000, "stream": True})
    assert_error(status, body, 400, "OUT_OF_RANGE", code="context_length_exceeded")
    status, body = gateway.post("/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}')
    assert_error(status, body, 413, code="request_too_large")
    # free-form fields echoed in answers: Infinity would break the answer's JSON after the model ran
    status, body = gateway.post("/v1/responses", b'{"input": "hi", "reasoning": {"effort": -Infinity}}')
    assert_error(status, body, 400, "-Infinity is not a JSON value")
    status, body = gateway.post("/v1/nowhere", {})
    assert_error(status, body, 404)
    # User input is quoted as a short prefix at most.
    status, body = gateway.post("/v1/completions", {"model": "m" * 400, "prompt": "x"})
    assert status == 404 and len(body["error"]["message"]) < 200


def test_grpc_statuses_map_to_openai_errors():
    # UNAUTHENTICATED comes from decode services that check tokens; the others are exercised for real here.
    cases = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
             grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.OUT_OF_RANGE: 400,
             grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
             grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
             grpc.StatusCode.DATA_LOSS: 502, grpc.StatusCode.INTERNAL: 502}
    assert {code: from_grpc(code, "x").status for code in cases} == cases
    assert from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs 4)").status == 413


def test_overload_is_429_and_no_replica_is_503():
    decode = ServiceProcess("decode", ["--colocated", "--max-queue", "0", "--redis-url", "off"])
    gateways = []
    try:
        decode.wait_serving()
        gateways = [start_gateway(decode.address), start_gateway("127.0.0.1:1")]
        full, dead = gateways
        for stream in (False, True):
            status, body = full.post("/v1/completions", {"prompt": "x", "stream": stream})
            assert_error(status, body, 429, "RESOURCE_EXHAUSTED", code="overloaded")
            status, body = dead.post("/v1/completions", {"prompt": "x", "stream": stream})
            assert_error(status, body, 503, "UNAVAILABLE", code="no_decode_service")
        host, port = dead.address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/health")
        reply = conn.getresponse()
        assert reply.status == 503 and json.loads(reply.read())["replicas"] == {"127.0.0.1:1": False}
    finally:
        for g in gateways:
            g.process.stop()
        decode.stop()


def _mutations(rng: random.Random):
    """Bodies near valid ones: fields dropped, retyped or set to extremes, text cut or corrupted. No weird value
    is a valid token count above 2, so the valid bodies among them generate at most 2 tokens."""
    weird = [None, True, -1, 0, 2**64, -(2**70), 1e308, -0.0, "", "x" * 700, "\u0000", "🙂" * 50, [], [[]],
             [None], {}, {"a": {"b": [1]}}, [1, "a"], [2**40], "NaN", ["stop"] * 40, [[1, 2], [3]],
             {"include_usage": "maybe"}, [{"role": "user"}], [{"role": "user", "content": 5}],
             [{"role": "user", "content": [{"type": "text"}]}], [{"content": "x"}]]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
              "top_k", "seed", "stop", "n", "stream", "stream_options", "user", "logprobs", "echo", "best_of",
              "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos",
              "response_format", "tools", "unknown_field", "top_logprobs", "min_p", "min_tokens", "stop_token_ids",
              "skip_special_tokens", "include_stop_str_in_output", "chat_template_kwargs", "use_beam_search",
              "input", "instructions", "text", "include", "metadata", "tool_choice", "truncation", "background",
              "previous_response_id"]
    while True:
        # Two length fields, so one corrupted byte cannot leave a valid chat without a limit.
        base = rng.choice([{"prompt": "hi", "max_tokens": 2, "max_completion_tokens": 2},
                           {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "max_completion_tokens": 2},
                           {"input": [{"role": "user", "content": "hi"}], "max_output_tokens": 2}])
        path = ("/v1/completions" if "prompt" in base else "/v1/chat/completions" if "messages" in base else
                "/v1/responses")
        body = dict(base)
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(fields)
            if rng.random() < 0.2:
                body.pop(key, None)
            else:
                body[key] = rng.choice(weird)
        body.setdefault("max_tokens", 2)  # without one a valid chat runs to the end of the context
        if path == "/v1/responses" and not isinstance(body.get("max_output_tokens"), int):
            body["max_output_tokens"] = 2
        raw = json.dumps(body).encode()
        if body.get("max_output_tokens") == 2:  # its one length field twice (JSON keeps the last), as chat has two
            raw = raw[:-1] + b', "max_output_tokens": 2}'

        kind = rng.random()
        if kind < 0.15:
            raw = raw[:rng.randint(0, len(raw))]
        elif kind < 0.25:
            pos = rng.randrange(len(raw))
            raw = raw[:pos] + bytes([rng.randrange(256)]) + raw[pos + 1:]
        elif kind < 0.3:
            raw = b'{"prompt": "\\ud800", "max_tokens": 1}'
        elif kind < 0.33:
            raw = b"[" * 100_000
        yield path, raw


def test_fuzzed_bodies_never_get_a_5xx(gateway):
    rng = random.Random(1234)
    statuses = []
    host, port = gateway.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for _, (path, raw) in zip(range(300), _mutations(rng)):
            conn.request("POST", path, raw, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            text = reply.read().decode()
            statuses.append(reply.status)
            assert reply.status < 500, (raw[:300], reply.status, text[:300])
            if reply.status >= 400:
                err = json.loads(text)["error"]
                assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
                assert len(err["message"]) < 400, err
    finally:
        conn.close()
    assert statuses.count(200) > 10 and sum(s == 400 for s in statuses) > 100  # both kinds were exercised
