"""A streamed Response's server-sent events, from the chat deltas of its one choice (zeroc/gateway/responses.py).

The order is OpenAI's: `response.created` and `response.in_progress`; then per output item `output_item.added`, for
text its `content_part.added`, the deltas (`reasoning_text.delta`, `output_text.delta` with the token's
log-probabilities, `function_call_arguments.delta`), their `.done` events and `output_item.done`; last
`response.completed` (or `response.incomplete` when `max_output_tokens` cut it, `response.failed` when the decode
call failed after the stream began), carrying the whole Response. An item ends where the next begins (thinking,
then the answer's text, then its function calls), so at most one text item is open at a time.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

from zeroc.client import Chunk, ClientError, Result, Usage
from zeroc.gateway.errors import APIError, check_finish, from_grpc
from zeroc.gateway.responses import ResponseShape, event
from zeroc.gateway.sse import Reply

log = logging.getLogger(__name__)
_DELTA = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta"}
_DONE = {"reasoning": "response.reasoning_text.done", "message": "response.output_text.done"}


class ResponseEvents:
    """The events of one streamed Response; `output` holds its items as they stand."""

    def __init__(self, shape: ResponseShape):
        self.shape, self.sequence = shape, 0
        self.output: list[dict] = []
        self._text: int | None = None  # the open reasoning or message item's output index
        self._calls: dict[int, int] = {}  # a chat tool call's index -> its item's output index
        # log-probabilities of tokens whose text a parser held back (it may begin a tool call or end thinking): they
        # go with the answer's text once it comes out, and are dropped if the tokens were a call's or thinking
        self._held: list[dict] = []

    def _emit(self, kind: str, **fields) -> bytes:
        data = event(kind, self.sequence, **fields)
        self.sequence += 1
        return data

    def start(self) -> bytes:
        response = self.shape.response("in_progress", [])
        return self._emit("response.created", response=response) + self._emit("response.in_progress",
                                                                              response=response)

    def delta(self, delta: dict, entries: list[dict]) -> bytes:
        """The events of one chat delta ({"reasoning_content", "content", "tool_calls"}, any of them) and the
        log-probabilities of its tokens (chat's `logprobs.content` entries)."""
        out, entries = b"", self._held + entries
        self._held = entries if not any(delta.get(k) for k in ("reasoning_content", "content", "tool_calls")) else []
        if delta.get("reasoning_content"):
            out += self._text_delta("reasoning", delta["reasoning_content"], [])
        if delta.get("content"):
            out += self._text_delta("message", delta["content"], entries)
        for call in delta.get("tool_calls") or []:
            out += self._call_delta(call)
        return out

    def finish(self, finish_reason: str | None, usage: Usage) -> bytes:
        status = "incomplete" if finish_reason == "length" else "completed"
        out = b"" if self.output else self._text_delta("message", "", [])  # an empty answer is an empty message
        out += self._close(status)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._emit(kind, response=self.shape.finished(self.shape.response(status, self.output, usage)))

    def fail(self, error: APIError) -> bytes:
        out = self._close("incomplete")
        return out + self._emit("response.failed", response=self.shape.response("failed", self.output, error=error))

    def _text_delta(self, kind: str, text: str, entries: list[dict]) -> bytes:
        out = b""
        if self._text is None or self.output[self._text]["type"] != kind:
            out += self._close_text("completed")
            index = self._text = len(self.output)
            item = (self.shape.reasoning_item(index, "", "in_progress") if kind == "reasoning" else
                    self.shape.message_item(index, "", "in_progress", []))
            self.output.append(item)
            out += self._emit("response.output_item.added", output_index=index, item={**item, "content": []})
            out += self._emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                              part=item["content"][0])
        index = self._text
        item = self.output[index]
        part = item["content"][0]
        if not text:
            return out
        part["text"] += text
        extra = {}
        if kind == "message":
            extra["logprobs"] = entries if self.shape.logprobs else []
            part["logprobs"] += extra["logprobs"]
        return out + self._emit(_DELTA[kind], item_id=item["id"], output_index=index, content_index=0, delta=text,
                                **extra)

    def _close_text(self, status: str) -> bytes:
        if self._text is None:
            return b""
        index, self._text = self._text, None
        item = self.output[index]
        item["status"] = status
        part = item["content"][0]
        extra = {"logprobs": part["logprobs"]} if item["type"] == "message" else {}
        return (self._emit(_DONE[item["type"]], item_id=item["id"], output_index=index, content_index=0,
                           text=part["text"], **extra) +
                self._emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part) +
                self._emit("response.output_item.done", output_index=index, item=item))

    def _call_delta(self, call: dict) -> bytes:
        out = b""
        if call["index"] not in self._calls:
            out += self._close_text("completed")
            index = self._calls[call["index"]] = len(self.output)
            item = self.shape.call_item(index, call["id"], call["function"]["name"], "", "in_progress")
            self.output.append(item)
            out += self._emit("response.output_item.added", output_index=index, item=item)
        index = self._calls[call["index"]]
        item, arguments = self.output[index], call["function"].get("arguments") or ""
        if not arguments:
            return out
        item["arguments"] += arguments
        return out + self._emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=arguments)

    def _close(self, status: str) -> bytes:
        """End every open item: the text item, then the function calls in order."""
        out = self._close_text(status)
        for index in self._calls.values():
            item = self.output[index]
            if item["status"] == "in_progress":
                item["status"] = status
                out += self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"])
                out += self._emit("response.output_item.done", output_index=index, item=item)
        return out


async def response_events(reply: Reply, shape: ResponseShape, first: Chunk | Result,
                          stream: AsyncIterator[Chunk | Result]) -> AsyncIterator[bytes]:
    """A Responses stream of one opened decode call, shaped through chat's `reply` (its reasoning and tool-call
    parsers); an error after the first event ends it with `response.failed`."""
    events = ResponseEvents(shape)
    head = events.start()
    # a named call's id and name: its item opens once the answer begins, after any thinking
    named = (reply.tools.head(0) or []) if reply.tools is not None else []
    try:
        item = first
        while isinstance(item, Chunk):
            choice = reply.chunk(item.text, item.token_ids, logprobs=item.logprobs)["choices"][0]
            delta = choice["delta"]
            if named and (delta.get("content") or delta.get("tool_calls")):  # the answer begins
                head, named = head + events.delta({"tool_calls": named}, []), []
            data = head + events.delta(delta, (choice["logprobs"] or {}).get("content") or [])
            head = b""
            if data:
                yield data
            item = await stream.__anext__()
        check_finish(item.finish_reason)
        last = reply.chunk("", [], item.finish_reason)["choices"][0]  # what the parsers held back
        head += events.delta({"tool_calls": named}, []) if named else b""
        tail = head + events.delta(last["delta"], []) + events.finish(last["finish_reason"], item.usage)
    except ClientError as exc:
        tail = head + events.fail(from_grpc(exc.code, exc.details))
    except APIError as exc:
        tail = head + events.fail(exc)
    except Exception:  # the status line is gone: the error goes in the stream, the traceback to the log
        log.exception("stream failed", extra={"request_id": shape.id})
        tail = head + events.fail(APIError(500, "internal error", "internal_error"))
    finally:
        await stream.aclose()
    yield tail
