"""The SDK: sync and asyncio clients against real services, typed results, errors and retries."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import grpc
import pytest

from zeroc.client import AsyncClient, Chunk, Client, ClientError, Result, RetryPolicy, collect
from zeroc.stack import ServiceProcess


def test_stream_yields_chunks_then_one_result(services):
    with Client(services.decode) as c:
        items = list(c.stream("The built-in function", max_tokens=6, ignore_eos=True, request_id="mine"))
        whole = c.generate("The built-in function", max_tokens=6, ignore_eos=True)
    assert all(isinstance(i, Chunk) for i in items[:-1]) and isinstance(items[-1], Result)
    assert items[-1].request_id == "mine" and items[-1].finish_reason == "length"
    assert [t for i in items[:-1] for t in i.token_ids] == whole.token_ids and len(whole.token_ids) == 6
    assert "".join(i.text for i in items[:-1]) == whole.text
    assert whole.usage.completion_tokens == 6 and whole.usage.ttft_ms > 0


def test_seeded_sampling_is_reproducible_across_paths(services):
    kwargs = dict(max_tokens=12, temperature=0.9, top_k=50, seed=7, ignore_eos=True)
    with Client(services.decode) as a, Client(services.colocated) as b:
        assert a.generate("Once upon a time", **kwargs).token_ids == b.generate("Once upon a time", **kwargs).token_ids


def test_async_client_matches_the_sync_client(services):
    prompts = ["import sys", "class Point:", "for i in range(10):", "The tuple"]
    with Client(services.decode) as c:
        want = [c.generate(p, max_tokens=8, ignore_eos=True).token_ids for p in prompts]

    async def main():
        async with AsyncClient(services.decode) as ac:
            results = await asyncio.gather(*(ac.generate(p, max_tokens=8, ignore_eos=True) for p in prompts))
            info = await ac.model_info()
        return [r.token_ids for r in results], info

    got, info = asyncio.run(main())
    assert got == want and info.mode == "disaggregated"


def test_logprobs_over_grpc_are_hugging_faces_on_both_paths(services, hf_model_of):
    """A request's log-probabilities reach the client per token, on the disaggregated path (the KV from the prefill
    service) and the colocated one alike, and equal the log-softmax of transformers' logits (the oracle)."""
    import torch

    from zeroc.config import BUNDLED_MODEL

    got = {}
    for path in (services.decode, services.colocated):
        with Client(path) as c:
            chunks = [i for i in c.stream("def read_file(path):", max_tokens=6, ignore_eos=True, logprobs=2)
                      if isinstance(i, Chunk)]
            whole = c.generate("def read_file(path):", max_tokens=6, ignore_eos=True, logprobs=2)
            prompt = c.tokenize("def read_file(path):")
            assert all(len(ch.logprobs) == len(ch.token_ids) for ch in chunks)
            assert [lp for ch in chunks for lp in ch.logprobs] == whole.logprobs
            assert not c.generate("def read_file(path):", max_tokens=2).logprobs  # none unless asked
        got[path] = whole
    a, b = got.values()
    assert a.token_ids == b.token_ids and len(a.logprobs) == 6
    with torch.no_grad():
        logits = hf_model_of(BUNDLED_MODEL)(torch.tensor([prompt + a.token_ids])).logits[0, len(prompt) - 1:-1]
    want = logits.float().log_softmax(-1)  # [6, V]
    for whole in (a, b):
        chosen = torch.tensor([lp.logprob for lp in whole.logprobs])
        torch.testing.assert_close(chosen, want.gather(1, torch.tensor(a.token_ids)[:, None])[:, 0], atol=1e-3,
                                   rtol=0)
        assert [[t for t, _ in lp.top] for lp in whole.logprobs] == want.topk(2).indices.tolist()


def test_prompt_logprobs_over_grpc_are_hugging_faces_and_reuse_no_cached_prefix(services, hf_model_of):
    """Prompt log-probabilities reach the client before the first token, on the disaggregated and colocated paths,
    equal to transformers' log-softmax; such a request computes its whole prompt on the decode service, even when
    the prefix cache and the prefill service hold it."""
    import torch

    from zeroc.config import BUNDLED_MODEL

    text = "def read_file(path):\n    with open(path) as f:"
    for path in (services.decode, services.colocated):
        with Client(path) as c:
            prompt = c.tokenize(text)
            c.generate(text, max_tokens=1)  # its blocks are in the prefix cache now
            items = list(c.stream(text, max_tokens=3, ignore_eos=True, prompt_logprobs=2))
            whole = collect(items)
            plain = c.generate(text, max_tokens=3, ignore_eos=True)
        firsts = [i for i in items if isinstance(i, Chunk) and i.prompt_token_ids]
        assert firsts and items.index(firsts[-1]) < min(i for i, x in enumerate(items) if getattr(x, "token_ids", 0))
        assert whole.prompt_token_ids == prompt and len(whole.prompt_logprobs) == len(prompt) - 1
        assert whole.token_ids == plain.token_ids and plain.prompt_logprobs is None
        assert (whole.usage.cached_prefix_tokens, whole.usage.kv_bytes_received) == (0, 0)
        with torch.no_grad():
            logp = hf_model_of(BUNDLED_MODEL)(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
        chosen = torch.tensor([lp.logprob for lp in whole.prompt_logprobs])
        torch.testing.assert_close(chosen, logp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=1e-3, rtol=0)
        assert [[t for t, _ in lp.top] for lp in whole.prompt_logprobs] == logp.topk(2).indices.tolist()


def test_a_long_prompts_entries_are_split_over_messages(monkeypatch):
    from decode_service import server
    from zeroc.sampling import TokenLogprobs

    monkeypatch.setattr(server, "PROMPT_SLICE", 4)
    entries = [TokenLogprobs(-float(i), ((i, -float(i)),)) for i in range(1, 10)]
    deltas = list(server.prompt_deltas(list(range(10)), entries))
    assert [list(d.prompt_token_ids) for d in deltas] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(d.prompt_logprobs) for d in deltas] == [3, 4, 2]
    assert [lp.logprob for d in deltas for lp in d.prompt_logprobs] == [-float(i) for i in range(1, 10)]


def test_errors_carry_the_status_and_bad_input_is_not_retried(services):
    with Client(services.decode) as c:
        with pytest.raises(ClientError) as err:
            c.generate("x", temperature=-2.0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details
    with Client(services.decode) as c:
        with pytest.raises(ClientError) as err:
            c.generate("x", logprobs=21)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.value.details
        with pytest.raises(ClientError) as err:
            c.generate("x", prompt_logprobs=21)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in err.value.details
        with pytest.raises(ClientError) as err:
            c.generate("x", repetition_penalty=-1.0)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty" in err.value.details


def test_async_errors(services):
    async def main():
        async with AsyncClient(services.colocated) as ac:
            await ac.generate("", max_tokens=2)

    with pytest.raises(ClientError) as err:
        asyncio.run(main())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_before_the_first_token_is_retried_until_the_service_is_up():
    port = _free_port()
    target = f"127.0.0.1:{port}"
    with Client(target, retry=RetryPolicy(attempts=1)) as c, pytest.raises(ClientError) as err:
        c.generate("nobody listens", max_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE

    outcome: dict = {}

    def call():
        try:
            with Client(target, retry=RetryPolicy(attempts=200, initial_backoff_s=0.05, max_backoff_s=0.5)) as c:
                outcome["result"] = c.generate("eventually", max_tokens=3, ignore_eos=True)
        except Exception as exc:  # reported below
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()  # fails (nothing listens), then retries while the service starts and loads
    svc = ServiceProcess("decode", ["--colocated", "--port", str(port)])
    try:
        caller.join(120)
        assert not caller.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"].token_ids) == 3
    finally:
        svc.stop()


class _Failed(grpc.RpcError):
    """A call's error as the retry policy reads it: its code."""

    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name} from the server"


@pytest.mark.parametrize("code, started, replica, retried", [
    (grpc.StatusCode.UNAVAILABLE, False, "", True),
    (grpc.StatusCode.UNAVAILABLE, True, "r1", False),  # tokens flowed: a retry would repeat them
    # A server shutting down cancels calls it received but never handed to a handler (grpc/grpc#41785): no
    # replica accepted them, so they are retried; a call a replica had accepted is not.
    (grpc.StatusCode.CANCELLED, False, "", True),
    (grpc.StatusCode.CANCELLED, False, "r1", False),
    (grpc.StatusCode.CANCELLED, True, "", False),
    (grpc.StatusCode.INVALID_ARGUMENT, False, "", False),
])
def test_only_calls_no_replica_ran_are_retried(code, started, replica, retried):
    from zeroc.client import _Deadline, _retry_delay

    delays = RetryPolicy(attempts=3).delays()
    if retried:
        assert _retry_delay(_Failed(code), started, delays, _Deadline(10.0), replica) >= 0
    else:
        with pytest.raises(ClientError) as err:
            _retry_delay(_Failed(code), started, delays, _Deadline(10.0), replica)
        assert err.value.code == code and err.value.replica == replica


def test_build_request_carries_a_guide_and_refuses_a_malformed_one():
    from zeroc.client import build_request

    req = build_request("Hi", guide={"json_schema": {"type": "object"}})
    assert json.loads(req.sampling.guide.json_schema) == {"type": "object"}
    assert list(build_request("Hi", guide={"choice": ("a", "b")}).sampling.guide.choice.choices) == ["a", "b"]
    assert build_request("Hi", guide={"json_object": True}).sampling.guide.WhichOneof("kind") == "json_object"
    assert not build_request("Hi").sampling.HasField("guide")
    after = build_request("Hi", guide={"regex": "a", "after": "</think>"}).sampling.guide
    assert (after.regex, after.after) == ("a", "</think>")
    for bad in ({}, {"regex": "a", "grammar": "b"}, {"xml": "a"}, ["regex"], {"after": "x"},
                {"regex": "a", "after": 3}):
        with pytest.raises(ValueError, match="guide: one of"):
            build_request("Hi", guide=bad)
