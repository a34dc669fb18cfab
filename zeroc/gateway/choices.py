"""Several choices of one request (`n` > 1): one decode call each, run together, answered as one.

Choice i samples with the request's seed + i (mod 2^64) when it has one, so the choices differ and the
request is reproducible; without a seed each call draws from its service's shared generator. The calls
start together, so they do not share the prompt's prefill (each prefills it; the prefix store serves
later requests). A call that fails before its first token fails the request, and the others are cancelled
(their KV freed). Streamed, each choice's events carry its `index` and interleave as tokens arrive; one
failing after tokens flowed ends the stream with an error event, as a single choice's would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator, Awaitable

from zeroc.client import Chunk, ClientError, Result, Usage
from zeroc.gateway.errors import APIError, check_finish, from_grpc
from zeroc.gateway.replicas import Replicas
from zeroc.gateway.sse import DONE, Reply, TokenEvents, sse

log = logging.getLogger(__name__)
Opened = tuple[Chunk | Result, AsyncIterator[Chunk | Result]]


def choice_calls(sampling: dict, n: int, request_id: str) -> list[dict]:
    """Each choice's keyword arguments for `Replicas.open`/`generate`: its own seed and request id."""
    if n == 1:
        return [dict(sampling, request_id=request_id)]
    seed = sampling["seed"]
    return [dict(sampling, request_id=f"{request_id}-{i}", seed=None if seed is None else (seed + i) % 2**64)
            for i in range(n)]


async def all_or_none(calls: list[Awaitable]) -> list:
    """Await every call; on the first failure (or cancellation) cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def open_all(replicas: Replicas, prompt, calls: list[dict]) -> list[Opened]:
    """Open every choice's stream; if one cannot be opened, close the ones that were and raise its error."""
    tasks = [asyncio.ensure_future(replicas.open(prompt, **c)) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                await t.result()[1].aclose()
        raise


def total_usage(results: list[Result]) -> Usage:
    """The prompt counted once (and its cached tokens, the first choice's), every choice's tokens."""
    first = results[0].usage
    return dataclasses.replace(first, completion_tokens=sum(r.usage.completion_tokens for r in results))


async def _pump(index: int, first: Chunk | Result, stream: AsyncIterator, queue: asyncio.Queue) -> None:
    """Put (index, item) for each of one choice's items, then (index, its error) if it fails."""
    item = first
    try:
        while True:
            await queue.put((index, item))
            if isinstance(item, Result):
                return
            item = await stream.__anext__()
    except Exception as exc:  # noqa: BLE001 (handed to the merged stream, which reports it)
        await queue.put((index, exc))


async def merged_events(reply: Reply, opened: list[Opened], include_usage: bool) -> AsyncIterator[bytes]:
    """`n` choices' events as they come, each with its index; the usage of all of them at the end."""
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(i, first, stream, queue)) for i, (first, stream) in enumerate(opened)]
    tokens = [TokenEvents(reply, i) for i in range(len(opened))]
    heads = [sse(reply.role_chunk(i)) if reply.chat else b"" for i in range(len(opened))]
    results: list[Result | None] = [None] * len(opened)
    tail = b""
    try:
        while any(r is None for r in results):
            i, item = await queue.get()
            if isinstance(item, Chunk):
                yield heads[i] + tokens[i].item(item)
            elif isinstance(item, Result):
                check_finish(item.finish_reason)
                results[i] = item
                yield heads[i] + sse(reply.chunk("", [], item.finish_reason, index=i))
            else:
                raise item
            heads[i] = b""
        if include_usage:
            tail = sse(reply.usage_chunk(total_usage(results)))
    except ClientError as exc:
        tail = sse(from_grpc(exc.code, exc.details).body())
    except APIError as exc:
        tail = sse(exc.body())
    except Exception:  # the status line is gone: the error goes in the stream, the traceback to the log
        log.exception("stream failed", extra={"request_id": reply.id})
        tail = sse(APIError(500, "internal error", "internal_error").body())
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for _, stream in opened:
            await stream.aclose()
    yield tail + DONE
