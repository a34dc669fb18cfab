"""Several choices of one request (`n` > 1, or a completions batch of prompts): one decode call each, run together,
answered as one.

Choice p * n + i is prompt p's i-th (OpenAI's order for a batch). It samples with the request's seed + i (mod 2^64)
when it has one, so a prompt's choices differ and the request is reproducible; without a seed each call draws
from its service's shared generator. The calls
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
Call = tuple[object, dict]  # a choice's prompt and keyword arguments for `Replicas.open`/`generate`


def choice_calls(sampling: dict, prompts: list, n: int, request_id: str) -> list[Call]:
    """Each choice's prompt and keyword arguments: its own seed and request id."""
    if len(prompts) == 1 and n == 1:
        return [(prompts[0], dict(sampling, request_id=request_id))]
    seed = sampling["seed"]
    return [(prompt, dict(sampling, request_id=f"{request_id}-{p * n + i}",
                          seed=None if seed is None else (seed + i) % 2**64))
            for p, prompt in enumerate(prompts) for i in range(n)]


async def all_or_none(calls: list[Awaitable]) -> list:
    """Await every call; on the first failure (or cancellation) cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def open_all(replicas: Replicas, calls: list[Call]) -> list[Opened]:
    """Open every choice's stream; if one cannot be opened, close the ones that were and raise its error."""
    tasks = [asyncio.ensure_future(replicas.open(prompt, **kw)) for prompt, kw in calls]
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


def total_usage(results: list[Result], n: int = 1) -> Usage:
    """Each prompt counted once (and its cached tokens: its first choice's), every choice's tokens; `results` in
    choice order, n a prompt."""
    firsts = [r.usage for r in results[::n]]
    return dataclasses.replace(firsts[0], prompt_tokens=sum(u.prompt_tokens for u in firsts),
                               cached_prefix_tokens=sum(u.cached_prefix_tokens for u in firsts),
                               completion_tokens=sum(r.usage.completion_tokens for r in results))


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


async def merged_events(reply: Reply, opened: list[Opened], include_usage: bool, n: int = 1) -> AsyncIterator[bytes]:
    """The choices' events as they come, each with its index; the usage of all of them at the end (n a prompt)."""
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
            tail = sse(reply.usage_chunk(total_usage(results, n)))
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
