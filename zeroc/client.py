"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a decode service.

Both stream typed `Chunk`s and end with a `Result`; `generate` collects a whole completion.
A call that fails with UNAVAILABLE before its first token (a replica starting, restarting or
draining) is retried with exponential backoff; once tokens have flowed, errors surface as-is
so no output is ever duplicated. Errors are raised as `ClientError` carrying the gRPC code.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc

from zeroc.tls import RECONNECT_OPTIONS, open_channel
from zeroc.v1 import generation_pb2 as pb
from zeroc.v1 import generation_pb2_grpc

_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


def _retry_delay(exc: grpc.RpcError, started: bool, delays) -> float | None:
    """Seconds to wait before retrying, or None to give up: only UNAVAILABLE before the first token
    is retried (after that, a retry would repeat tokens the caller already has)."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not started:
        return next(delays, None)
    return None


class ClientError(RuntimeError):
    """A failed call: `code` is the gRPC status code, the message its details."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


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
class Chunk:
    """New tokens and text of a stream."""

    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Result:
    """The end of a stream (and, from `generate`, the whole completion)."""

    request_id: str
    finish_reason: str
    usage: Usage
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


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
                  top_p: float = 1.0, seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
                  ignore_eos: bool = False, request_id: str = "", model: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop=list(stop), ignore_eos=ignore_eos)
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=sampling)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    return req


def _convert(msg: pb.GenerateResponse) -> Chunk | Result:
    if msg.HasField("delta"):
        return Chunk(list(msg.delta.token_ids), msg.delta.text)
    u = msg.result.usage
    return Result(msg.request_id, _REASONS.get(msg.result.finish_reason, "stop"),
                  Usage(u.prompt_tokens, u.completion_tokens, u.ttft_ms, u.cached_prefix_tokens, u.kv_bytes_received,
                        u.queue_ms, u.preemptions))


def _collect(items: list[Chunk | Result]) -> Result:
    end = items[-1]
    assert isinstance(end, Result), "stream ended without a result"
    chunks = [c for c in items if isinstance(c, Chunk)]
    return Result(end.request_id, end.finish_reason, end.usage, [t for c in chunks for t in c.token_ids],
                  "".join(c.text for c in chunks))


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class Client:
    """Blocking client. `timeout` (seconds) is each call's deadline; None waits indefinitely. `token`: a
    bearer token, sent with every call, for services that require one. `ca`: PEM of the CA that signed
    the service's certificate (TLS); None talks plaintext (loopback)."""

    def __init__(self, target: str, timeout: float | None = 60.0, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, ca: bytes | None = None):
        self.target, self.timeout, self.retry = target, timeout, retry
        self._metadata = _metadata(token)
        self._channel = open_channel(target, ca=ca)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    def stream(self, prompt: str | list[int], **kwargs) -> Iterator[Chunk | Result]:
        """Yield `Chunk`s as tokens arrive, then one `Result`. kwargs: see `build_request`."""
        request = build_request(prompt, **kwargs)
        delays = self.retry.delays()
        while True:
            started = False
            call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
            try:
                for msg in call:
                    started = True
                    yield _convert(msg)
                return
            except grpc.RpcError as exc:
                delay = _retry_delay(exc, started, delays)
                if delay is None:
                    raise ClientError(exc.code(), exc.details()) from None
                time.sleep(delay)
            finally:
                call.cancel()  # no-op once finished; frees the server's blocks if the caller stops early

    def generate(self, prompt: str | list[int], **kwargs) -> Result:
        """The whole completion."""
        return _collect(list(self.stream(prompt, **kwargs)))

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._unary(self._stub.Tokenize, pb.TokenizeRequest(
            text=text, add_special_tokens=add_special_tokens)).token_ids)

    def _unary(self, method, request):
        delays = self.retry.delays()
        while True:
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = next(delays, None) if exc.code() == grpc.StatusCode.UNAVAILABLE else None
                if delay is None:
                    raise ClientError(exc.code(), exc.details()) from None
                time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as `Client` (stream is an async iterator)."""

    def __init__(self, target: str, timeout: float | None = 60.0, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, ca: bytes | None = None):
        self.target, self.timeout, self.retry = target, timeout, retry
        self._metadata = _metadata(token)
        self._channel = (grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca), options=RECONNECT_OPTIONS)
                         if ca else grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS))
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    async def stream(self, prompt: str | list[int], **kwargs) -> AsyncIterator[Chunk | Result]:
        request = build_request(prompt, **kwargs)
        delays = self.retry.delays()
        while True:
            started = False
            call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
            try:
                async for msg in call:
                    started = True
                    yield _convert(msg)
                return
            except grpc.RpcError as exc:
                delay = _retry_delay(exc, started, delays)
                if delay is None:
                    raise ClientError(exc.code(), exc.details()) from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def generate(self, prompt: str | list[int], **kwargs) -> Result:
        return _collect([item async for item in self.stream(prompt, **kwargs)])

    async def model_info(self) -> pb.GetModelInfoResponse:
        try:
            return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                                 metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details()) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
