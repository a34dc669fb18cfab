"""Several choices of one request (`n` > 1, or a completions batch of prompts): one decode call each, answered as
one.

Choice p * n + i is prompt p's i-th (OpenAI's order for a batch). It samples with the request's seed + i (mod 2^64)
when it has one, so a prompt's choices differ and the request is reproducible; without a seed each call draws
from its service's shared generator. A prompt's first choice starts first and its others once it has its first
token, so they read the prompt's full blocks from the KV store rather than compute them again (`open_all`; not
for prompt log-probabilities, which need the prompt computed). A call that fails before its first token fails the
request, and the others are cancelled (their KV freed). Streamed, each choice's events carry its `index` and
interleave as tokens arrive; one failing after tokens flowed ends the stream with an error event, as a single
choice's would.
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


async def open_all(replicas: Replicas, calls: list[Call], n: int = 1, share: bool = True) -> list[Opened]:
    """Open every choice's stream (calls in choice order, n a prompt). With `share`, a prompt's first choice opens
    first and its other choices once it has its first item: by then its decode service has published the prompt's
    full blocks to the KV store, where the others read them instead of computing the prompt again (vLLM's parallel
    sampling shares the prompt's blocks likewise). If one cannot be opened, close the ones that were and raise its
    error."""
    groups = [calls[at: at + n] for at in range(0, len(calls), n)] if share and n > 1 else [[c] for c in calls]
    return [o for group in await _every([_open_group(replicas, g) for g in groups]) for o in group]


async def _open_group(replicas: Replicas, group: list[Call]) -> list[Opened]:
    """One prompt's choices: the first, then the others together."""
    (prompt, kw), others = group[0], group[1:]
    lead = await replicas.open(prompt, **kw)
    try:
        return [lead, *(o for one in await _every([_open_one(replicas, c) for c in others]) for o in one)]
    except BaseException:
        await lead[1].aclose()
        raise


async def _open_one(replicas: Replicas, call: Call) -> list[Opened]:
    return [await replicas.open(call[0], **call[1])]


async def _every(openers: list[Awaitable[list[Opened]]]) -> list[list[Opened]]:
    """Await openers together; if one fails (or this is cancelled), cancel the rest, close every stream they
    opened and raise."""
    tasks = [asyncio.ensure_future(c) for c in openers]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                for _, stream in t.result():
                    await stream.aclose()
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
