"""The JSON of each answer and the server-sent events of a streamed one, cheap per token.

A stream's token events differ only in their text (and token ids), so `TokenEvents` encodes the rest
of the event once per stream, from the same `Reply.chunk` the other events come from, and a token
costs one string escape and one join (unless its event holds more than its text: log-probabilities, tool calls,
reasoning). `EventStream` writes each event with one ASGI send, without
Starlette's StreamingResponse (an anyio task group, per-chunk type checks); it stops, closing its
source (which cancels the gRPC call), as soon as the client disconnects, even while no token is due.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

from zeroc.client import Chunk, Result, TokenLogprob, Usage
from zeroc.gateway.logprobs import LogprobFormat
from zeroc.gateway.reasoning import Reasoning
from zeroc.gateway.tools import ToolCalls

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"
Prompt = tuple[list[int], list[TokenLogprob]]  # an echoed prompt: its ids, and one entry per id from the second
# What json.dumps (ensure_ascii, as in `sse`) makes of a str, quotes included; the C implementation.
_encode_str = json.encoder.encode_basestring_ascii
_TEXT_MARK = "\x00zeroc-text\x00"  # stand-ins, cut out of one encoded token event
_IDS_MARK = -7


def sse(obj: dict | str) -> bytes:
    """One `data:` event: a JSON object, or a literal such as "[DONE]"."""
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))).encode() + b"\n\n"


def usage_dict(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prefix_tokens}}


@dataclass(frozen=True)
class Reply:
    """Shapes one request's answer: `chat` picks chat.completion over text_completion objects."""

    id: str
    model: str
    chat: bool
    token_ids: bool  # the return_token_ids extension
    created: int
    logprobs: LogprobFormat | None = None  # set when the request asked for log-probabilities
    tools: ToolCalls | None = None  # set when a chat's tool_choice forces a call: its choices are calls
    reasoning: Reasoning | None = None  # set when the gateway has a reasoning parser: thinking apart from content

    def _choice(self, text: str, ids: list[int], finish: str | None, stream: bool,
                logprobs: list[TokenLogprob] | None = None, index: int = 0, prompt: Prompt | None = None) -> dict:
        if not self.chat:
            body = {"text": text}
        elif self.tools is not None or self.reasoning is not None:
            shaped, finish = self._message(text, finish, stream, index)
            body = {"delta" if stream else "message": shaped}
        elif stream:
            body = {"delta": {"content": text} if text or finish is None else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        rendered = (self.logprobs.render(ids, logprobs or [], index, prompt)
                    if self.logprobs is not None and (logprobs or prompt) else None)
        out = {"index": index, **body, "logprobs": rendered, "finish_reason": finish}
        if self.token_ids:
            out["token_ids"] = ids
        return out

    def _message(self, text: str, finish: str | None, stream: bool, index: int) -> tuple[dict, str | None]:
        """A chat choice's message (or delta) and finish reason where the text is more than content: the thinking
        apart (zeroc/gateway/reasoning.py), then the content's tool calls (zeroc/gateway/tools.py)."""
        thought = None
        if self.reasoning is not None:
            thought, text = (self.reasoning.delta(index, text, finish is not None) if stream
                             else self.reasoning.whole(text))
        if self.tools is not None:
            shaped, finish = (self.tools.delta if stream else self.tools.message)(text, finish, index)
        elif stream:
            shaped = {"content": text} if text else {}
        else:
            shaped = {"role": "assistant", "content": text or (None if thought is not None else "")}
        if thought or (thought is not None and not stream):
            shaped = {**shaped, "reasoning_content": thought, "reasoning": thought}  # DeepSeek's name, vLLM's
        return shaped, finish

    def _object(self, stream: bool) -> str:
        return ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"

    def chunk(self, text: str, ids: list[int], finish: str | None = None,
              logprobs: list[TokenLogprob] | None = None, index: int = 0, prompt: Prompt | None = None) -> dict:
        return {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
                "choices": [self._choice(text, ids, finish, True, logprobs, index, prompt)]}

    def role_chunk(self, index: int = 0) -> dict:
        body = self.chunk("", [], index=index)
        head = self.tools.head(index) if self.tools is not None else None
        body["choices"][0]["delta"] = ({"role": "assistant", "content": ""} if head is None else
                                       {"role": "assistant", "content": None, "tool_calls": head})
        return body

    def usage_chunk(self, usage: Usage) -> dict:
        return {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
                "choices": [], "usage": usage_dict(usage)}

    def whole(self, results: list[Result], usage: Usage) -> dict:
        """The answer of a request with one choice per result (`n`)."""
        return {"id": self.id, "object": self._object(False), "created": self.created, "model": self.model,
                "choices": [self._choice(r.text, r.token_ids, r.finish_reason, False, r.logprobs, i, _prompt(r))
                            for i, r in enumerate(results)],
                "usage": usage_dict(usage)}


class TokenEvents:
    """The bytes of `sse(reply.chunk(text, ids, index=index))` for a token event of choice `index`, built from
    pieces encoded once (a request with log-probabilities, or whose choices are tool calls, encodes each event
    whole: its tokens' objects differ in more than text)."""

    def __init__(self, reply: Reply, index: int = 0):
        self._reply, self._index = reply, index
        if reply.logprobs is not None or reply.tools is not None or reply.reasoning is not None:
            return  # each event encoded whole (`token`)
        whole = sse(reply.chunk(_TEXT_MARK, [_IDS_MARK], index=index))
        head, tail = _cut(whole, _encode_str(_TEXT_MARK).encode())
        self._head = head
        self._ids: tuple[bytes, bytes] | None = _cut(tail, b"%d" % _IDS_MARK) if reply.token_ids else None
        self._tail = tail

    def item(self, chunk: Chunk) -> bytes:
        """A stream chunk's event (with the prompt's entries where it echoes the prompt)."""
        return self.token(chunk.text, chunk.token_ids, chunk.logprobs, _prompt(chunk))

    def token(self, text: str, ids: list[int], logprobs: list[TokenLogprob] | None = None,
              prompt: Prompt | None = None) -> bytes:
        if self._reply.logprobs is not None or self._reply.tools is not None or self._reply.reasoning is not None:
            body = self._reply.chunk(text, ids, logprobs=logprobs, index=self._index, prompt=prompt)
            # nothing to send yet ("required" before the end, text held while it may begin a marker)
            quiet = self._reply.logprobs is None and not body["choices"][0]["delta"]
            return b"" if quiet else sse(body)
        if self._ids is None:
            return b"".join((self._head, _encode_str(text).encode(), self._tail))
        mid, end = self._ids
        return b"".join((self._head, _encode_str(text).encode(), mid, ",".join(map(str, ids)).encode(), end))


def _prompt(item: Chunk | Result) -> Prompt | None:
    """An echoed prompt's ids and entries, where the item carries them."""
    return (item.prompt_token_ids, item.prompt_logprobs or []) if item.prompt_token_ids else None


def _cut(data: bytes, mark: bytes) -> tuple[bytes, bytes]:
    before, found, after = data.partition(mark)
    if not found or mark in after:
        raise ValueError(f"event template: expected {mark!r} once in {data[:200]!r}")
    return before, after


class EventStream(Response):
    """A 200 text/event-stream of `events` (bytes, each one or more whole events), one ASGI send each.
    `close` (optional) runs however the response ends, even if `events` never started: it releases
    what `events` would have released (the gRPC call)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 close: Callable[[], Awaitable[None]] | None = None):
        self.events, self.close = events, close
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send) -> None:
        tasks: list[asyncio.Future] = []
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            tasks = [asyncio.ensure_future(self._relay(send)), asyncio.ensure_future(wait_disconnect(receive))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.aclose()  # also when cancelled mid-token: the gRPC call ends here
            if self.close is not None:
                await self.close()
        relay = tasks[0]
        if not relay.cancelled() and isinstance(relay.exception(), OSError):
            log.debug("client went away mid-send")
        elif not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()

    async def _relay(self, send) -> None:
        async for data in self.events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def wait_disconnect(receive) -> None:
    """Returns once the ASGI server reports the client gone."""
    while (await receive())["type"] != "http.disconnect":
        pass
