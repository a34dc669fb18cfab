"""Structured output through real decode service processes (the session's disaggregated one, which runs ahead, and
its colocated one): a guided request gives the same text from both, beside free requests it leaves alone; a guide
that is malformed or does not compile is INVALID_ARGUMENT, and the service goes on serving."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from token_markers import one_token_text
from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL
from zeroc.tokenizer import Tokenizer
from zeroc.v1 import generation_pb2 as pb

EMAIL = r"[a-z]{2,6}@[a-z]{2,6}\.(com|org)"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}


def _run(address: str) -> list:
    """A regex, a schema and a choice request beside a free one, all at once."""
    with Client(address, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        calls = [dict(guide={"regex": EMAIL}, temperature=0.8, seed=5), dict(guide={"json_schema": SCHEMA}),
                 dict(guide={"choice": ["yes", "no"]}, temperature=1.0, seed=9), dict(ignore_eos=True)]
        return list(pool.map(lambda kw: client.generate("The answer is", max_tokens=30, **kw), calls))


def test_guided_requests_hold_and_give_the_same_text_disaggregated_and_colocated(services):
    got = _run(services.decode)
    assert [r.token_ids for r in got] == [r.token_ids for r in _run(services.colocated)]
    regex, schema, choice, free = got
    assert all(r.finish_reason == "stop" for r in (regex, schema, choice))
    assert re.fullmatch(EMAIL, regex.text) and choice.text in ("yes", "no")
    value = json.loads(schema.text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    with Client(services.decode, timeout=120) as client:
        assert free.token_ids == client.generate("The answer is", max_tokens=30, ignore_eos=True).token_ids


def test_a_guide_after_a_token_leaves_the_text_up_to_it_free(services):
    """`Guide.after` over gRPC (the gateway sends a reasoning model's "</think>" there): the text up to the marker is
    the free text's, the text after it the guide's."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL)
    with Client(services.decode, timeout=120) as client:
        free = client.generate("The answer is", max_tokens=24).token_ids
        marker, text = one_token_text(tokenizer, free)
        at = free.index(marker)
        got = client.generate("The answer is", max_tokens=at + 41, guide={"regex": EMAIL, "after": text})
    assert got.token_ids[: at + 1] == free[: at + 1] and got.finish_reason == "stop"
    assert re.fullmatch(EMAIL, tokenizer.decode(got.token_ids[at + 1:])), got.text


@pytest.mark.parametrize("guide, words", [
    (pb.Guide(), "set one kind"), (pb.Guide(json_object=False), "set one kind"),
    (pb.Guide(regex="a(b"), "regex does not compile"), (pb.Guide(json_schema="{"), "json schema does not compile"),
    (pb.Guide(grammar="root ::= x"), "grammar does not compile"), (pb.Guide(regex="a" * 70000), "at most 65536"),
    (pb.Guide(choice=pb.Guide.Choices(choices=["a", ""])), "non-empty"),
    (pb.Guide(regex="a", after="not one token"), "must be one"), (pb.Guide(regex="a", after="x" * 65), "at most 64")])
def test_bad_guides_are_invalid_argument_and_the_service_serves_on(services, guide, words):
    request = pb.GenerateRequest(prompt="Hello", sampling=pb.SamplingParams(max_tokens=2, guide=guide))
    with grpc.insecure_channel(services.decode) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(channel.unary_stream("/zeroc.v1.GenerationService/Generate")(request.SerializeToString()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    with Client(services.decode, timeout=60) as client:
        assert client.generate("Hello", max_tokens=2, guide={"choice": ["ok"]}).text == "ok"
