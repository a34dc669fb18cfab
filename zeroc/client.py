"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for decode services.

Both stream typed `Chunk`s and end with a `Result`; `generate` collects a whole completion.
A client talks to one replica or several: a list of addresses, or one gRPC target naming many
(``dns:///decode.svc:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``). Calls are spread over the
replicas by gRPC's own ``round_robin`` policy, which also skips replicas of such a set whose health
check does not say SERVING (loading, draining). A call that fails with UNAVAILABLE before its first token (a replica
starting, restarting, draining or gone), or with CANCELLED before any replica accepted it (a server shutting
down), is retried, landing on the next replica, with exponential
backoff; once tokens have flowed, errors surface as-is so no output is ever duplicated. `timeout`
bounds a call with all its retries. Errors are raised as `ClientError` carrying the gRPC code.

Which replica served a call: `Result.replica` and `ClientError.replica` carry the opaque id the decode
service sends in the ``zeroc-replica`` initial-metadata header once it has accepted a call (the last
attempt's, when there were retries; "" when no replica accepted it, e.g. it was refused while draining
or unreachable). The id is drawn once per service process, so two replicas, and one replica before and
after a restart, differ: enough to tell where a failed call was running (`zeroc bench chaos` does).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Iterator, Sequence

import grpc

from zeroc.rpc import REPLICA_HEADER
from zeroc.tls import RECONNECT_OPTIONS, open_channel
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import generation_pb2_grpc

_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


# Round-robin over every address the target resolves to. For a target naming a set of replicas each is
# health-checked too (grpc.health.v1, the server's overall status): one reporting NOT_SERVING (loading,
# draining) takes no new calls. A plain HOST:PORT is not health-checked, so its caller sees the service's
# own answers (UNAVAILABLE "the model is still loading", ...).
ROUND_ROBIN = {"loadBalancingConfig": [{"round_robin": {}}]}
HEALTH_CHECKED = {**ROUND_ROBIN, "healthCheckConfig": {"serviceName": ""}}


def balancing_options(target: str | Sequence[str]) -> list[tuple[str, str]]:
    """Channel options for `target` as given to a client: round_robin, health-checked for a set of replicas."""
    several = not isinstance(target, str) or target.startswith(("ipv4:", "ipv6:")) or ":///" in target
    return [("grpc.service_config", json.dumps(HEALTH_CHECKED if several else ROUND_ROBIN))]


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one address, a target gRPC resolves itself (``dns:///``, ``ipv4:``...), or a list of
    IP addresses (``ipv4:``/``ipv6:`` target lists; names need a ``dns:///`` target). Raises ValueError."""
    targets = [target] if isinstance(target, str) else list(target)
    if not targets or any(not t for t in targets):
        raise ValueError(f"target: at least one non-empty address is needed, got {targets!r}")
    if len(targets) == 1:
        return targets[0]
    hosts = []
    for t in targets:
        host, _, port = t.rpartition(":")
        try:
            hosts.append(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            raise ValueError(f"target: several addresses must be IP:PORT ({t!r} is not); name a set of replicas "
                             "with one dns:///NAME:PORT target") from None
        if not port.isdigit():
            raise ValueError(f"target: {t!r} has no port")
    if len({h.version for h in hosts}) > 1:
        raise ValueError("target: mix of IPv4 and IPv6 addresses; give one family")
    return f"ipv{hosts[0].version}:" + ",".join(targets)


class _Deadline:
    """A call's deadline over all its attempts (None: none)."""

    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def check(self) -> float | None:
        """The time left for the next attempt; ClientError DEADLINE_EXCEEDED once none is."""
        left = self.left()
        if left is not None and left <= 0:
            raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while retrying")
        return left


def _retry_delay(exc: grpc.RpcError, started: bool, delays, deadline: _Deadline, replica: str = "") -> float:
    """Seconds to wait before retrying; raises the call's `ClientError` to give up. Only a call no replica ran
    is retried: UNAVAILABLE before the first token (after that, a retry would repeat tokens the caller already
    has), or CANCELLED before any replica accepted it. A server that shuts down cancels the calls it had
    received but not yet handed to a handler, with CANCELLED rather than UNAVAILABLE (grpc/grpc#41785); this
    client cancels its own calls only after it stopped reading. Only while the deadline leaves room."""
    unrun = exc.code() == grpc.StatusCode.UNAVAILABLE or (exc.code() == grpc.StatusCode.CANCELLED and not replica)
    delay = next(delays, None) if unrun and not started else None
    left = deadline.left()
    if delay is None or (left is not None and left <= delay):
        raise ClientError(exc.code(), exc.details(), replica) from None
    return delay


def _replica(metadata) -> str:
    """The replica id in a call's initial metadata ("" when it sent none)."""
    return next((v for k, v in metadata or () if k == REPLICA_HEADER), "")


class ClientError(RuntimeError):
    """A failed call: `code` is the gRPC status code, the message its details; `replica` the id of the
    replica that had accepted the call's last attempt ("" if none had; see the module docstring)."""

    def __init__(self, code: grpc.StatusCode, details: str, replica: str = ""):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.replica = code, details, replica


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    cached_prefix_tokens: int
    kv_bytes_received: int
    queue_ms: float = 0.0  # waited for KV cache space or a batch slot before first scheduled
    preemptions: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens' at its position (id, log-probability),
    most likely first: what `logprobs=n` asks for."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Chunk:
    """New tokens and text of a stream."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, if asked for
    # `prompt_logprobs=n`: the first chunks carry the prompt (ids) and its entries, one per token from the second
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """The end of a stream (and, from `generate`, the whole completion)."""

    request_id: str
    finish_reason: str
    usage: Usage
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    replica: str = ""  # the id of the replica that served the call (module docstring)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # from `generate`: one per token id, if asked for
    # from `generate` with `prompt_logprobs=n`: the prompt's ids, and one entry per prompt token from the second
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE before the first token: attempts in all, backoff doubling to a cap."""

    attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.max_backoff_s)


def build_request(prompt: str | list[int], *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
                  stop: list[str] | tuple[str, ...] = (), stop_token_ids: list[int] | tuple[int, ...] = (),
                  ignore_eos: bool = False, request_id: str = "", model: str = "",
                  logprobs: int | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                  repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None,
                  prompt_logprobs: int | None = None, guide: dict | None = None,
                  skip_special_tokens: bool = True, min_tokens: int = 0,
                  include_stop_str_in_output: bool = False, priority: int = 0) -> pb.GenerateRequest:
    """`logprobs`: None for none; n to get each token's log-probability and the n most likely tokens' (0-20).
    `prompt_logprobs`: the same for each prompt token from the second on (the request reuses no cached prefix).
    `guide`: structured output, one of {"json_object": True}, {"json_schema": schema (a dict or JSON text)},
    {"regex": pattern}, {"choice": [strings]}, {"grammar": GBNF text}, optionally with "after": one token's text
    after which it applies (a reasoning model's "</think>"). `skip_special_tokens` False keeps special tokens' text
    (markers such as Mistral's [TOOL_CALLS]). `priority`: lower runs first, on a decode service started with
    `--scheduling-policy priority` (GenerateRequest.priority). The penalties, the guide and the rest:
    protos/zeroc/v1/generation.proto's SamplingParams."""
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 min_p=min_p, stop=list(stop), stop_token_ids=list(stop_token_ids),
                                 ignore_eos=ignore_eos, min_tokens=min_tokens,
                                 include_stop_str_in_output=include_stop_str_in_output,
                                 frequency_penalty=frequency_penalty,
                                 presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
                                 logit_bias=logit_bias or {})
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:
        sampling.logprobs = logprobs
    if prompt_logprobs is not None:
        sampling.prompt_logprobs = prompt_logprobs
    if guide is not None:
        sampling.guide.CopyFrom(guide_to_proto(guide))
    if not skip_special_tokens:
        sampling.skip_special_tokens = False
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=sampling, priority=priority)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    return req


GUIDE_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


def guide_to_proto(guide: dict) -> pb.Guide:
    """A guide dict (`build_request`'s) as its message. Raises ValueError unless it holds one known kind (and at
    most an "after" string beside it)."""
    kinds = [k for k in guide if k != "after"] if isinstance(guide, dict) else []
    if len(kinds) != 1 or kinds[0] not in GUIDE_KINDS or not isinstance(guide.get("after", ""), str):
        raise ValueError(f"guide: one of {', '.join(GUIDE_KINDS)} as its only key (and an \"after\" string), got "
                         f"{guide!r:.200}")
    kind, value, after = kinds[0], guide[kinds[0]], guide.get("after", "")
    if kind == "choice":
        return pb.Guide(choice=pb.Guide.Choices(choices=list(value)), after=after)
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    return pb.Guide(**{kind: value}, after=after)


def _convert(msg: pb.GenerateResponse) -> Chunk | Result:
    if msg.HasField("delta"):
        d = msg.delta
        return Chunk(list(d.token_ids), d.text, _logprobs(d.logprobs), list(d.prompt_token_ids),
                     _logprobs(d.prompt_logprobs))
    u = msg.result.usage
    return Result(msg.request_id, _REASONS.get(msg.result.finish_reason, "stop"),
                  Usage(u.prompt_tokens, u.completion_tokens, u.ttft_ms, u.cached_prefix_tokens, u.kv_bytes_received,
                        u.queue_ms, u.preemptions))


def _logprobs(entries) -> list[TokenLogprob]:
    return [TokenLogprob(lp.logprob, list(zip(lp.top_token_ids, lp.top_logprobs))) for lp in entries]


def collect(items: list[Chunk | Result]) -> Result:
    """A stream's items as one `Result`: the whole completion."""
    end = items[-1]
    assert isinstance(end, Result), "stream ended without a result"
    chunks = [c for c in items if isinstance(c, Chunk)]
    return Result(end.request_id, end.finish_reason, end.usage, [t for c in chunks for t in c.token_ids],
                  "".join(c.text for c in chunks), end.replica, [lp for c in chunks for lp in c.logprobs],
                  [t for c in chunks for t in c.prompt_token_ids],
                  [lp for c in chunks for lp in c.prompt_logprobs] if any(c.prompt_token_ids for c in chunks) else None)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class Client:
    """Blocking client. `target`: a decode service's HOST:PORT, a list of them, or a gRPC target naming
    several (module docstring). `timeout` (seconds) is each call's deadline, retries included; None waits
    indefinitely. `token`: a bearer token, sent with every call, for services that require one. `ca`: PEM
    of the CA that signed the service's certificate (TLS); None talks plaintext (loopback). A stream the
    caller closes early (or a `generate` whose thread is interrupted) cancels its call."""

    def __init__(self, target: str | Sequence[str], timeout: float | None = 60.0, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, ca: bytes | None = None):
        self.target, self.timeout, self.retry = channel_target(target), timeout, retry
        self._metadata = _metadata(token)
        self._channel = open_channel(self.target, ca=ca, options=balancing_options(target))
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    def stream(self, prompt: str | list[int], token: str | None = None, **kwargs) -> Iterator[Chunk | Result]:
        """Yield `Chunk`s as tokens arrive, then one `Result`. `token`: this call's bearer token in place of the
        client's ("": none; a gateway forwards each of its callers' own). kwargs: see `build_request`."""
        request = build_request(prompt, **kwargs)
        delays, deadline = self.retry.delays(), _Deadline(self.timeout)
        metadata = self._metadata if token is None else _metadata(token)
        while True:
            started = False
            call = self._stub.Generate(request, timeout=deadline.check(), metadata=metadata)
            try:
                for msg in call:
                    started = True
                    item = _convert(msg)
                    yield replace(item, replica=_replica(call.initial_metadata())) if isinstance(item, Result) \
                        else item
                return
            except grpc.RpcError as exc:
                time.sleep(_retry_delay(exc, started, delays, deadline, _replica(call.initial_metadata())))
            finally:
                call.cancel()  # no-op once finished; frees the server's blocks if the caller stops early

    def generate(self, prompt: str | list[int], **kwargs) -> Result:
        """The whole completion."""
        return collect(list(self.stream(prompt, **kwargs)))

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._unary(self._stub.Tokenize, pb.TokenizeRequest(
            text=text, add_special_tokens=add_special_tokens)).token_ids)

    def _unary(self, method, request):
        delays, deadline = self.retry.delays(), _Deadline(self.timeout)
        while True:
            try:
                return method(request, timeout=deadline.check(), metadata=self._metadata)
            except grpc.RpcError as exc:
                time.sleep(_retry_delay(exc, False, delays, deadline))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as `Client` (stream is an async iterator)."""

    def __init__(self, target: str | Sequence[str], timeout: float | None = 60.0, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, ca: bytes | None = None):
        self.target, self.timeout, self.retry = channel_target(target), timeout, retry
        self._metadata = _metadata(token)
        options = [*RECONNECT_OPTIONS, *balancing_options(target)]
        self._channel = (grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(ca), options=options)
                         if ca else grpc.aio.insecure_channel(self.target, options=options))
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    async def stream(self, prompt: str | list[int], token: str | None = None, **kwargs
                     ) -> AsyncIterator[Chunk | Result]:
        """As `Client.stream`; cancelling the task that iterates cancels the call."""
        request = build_request(prompt, **kwargs)
        delays, deadline = self.retry.delays(), _Deadline(self.timeout)
        metadata = self._metadata if token is None else _metadata(token)
        while True:
            call = self._stub.Generate(request, timeout=deadline.check(), metadata=metadata)
            started = False
            try:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    started = True
                    item = _convert(msg)
                    yield replace(item, replica=_replica(await call.initial_metadata())) \
                        if isinstance(item, Result) else item
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(_retry_delay(exc, started, delays, deadline,
                                                 _replica(await call.initial_metadata())))
            finally:
                call.cancel()

    async def generate(self, prompt: str | list[int], **kwargs) -> Result:
        return collect([item async for item in self.stream(prompt, **kwargs)])

    async def model_info(self) -> pb.GetModelInfoResponse:
        delays, deadline = self.retry.delays(), _Deadline(self.timeout)
        while True:
            try:
                return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=deadline.check(),
                                                     metadata=self._metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(_retry_delay(exc, False, delays, deadline))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
