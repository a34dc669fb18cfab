"""The gateway's server-sent events: token events built from pre-encoded pieces are byte for byte the JSON
of `Reply.chunk`, and the event stream relays in order and always releases its source, whether the client
stays, disconnects while no token is due, or is gone before the status line."""

from __future__ import annotations

import asyncio
import json

import pytest

from zeroc.gateway.sse import EventStream, Reply, TokenEvents, sse

TEXTS = [("", []), (" the", [262]), ('a "quoted" \\ back\nslash\t\x00\x1f', [1, 2]), ("é€😀 中文", [3, 4, 5])]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("token_ids", [False, True])
def test_token_events_are_the_json_of_reply_chunk(chat, token_ids):
    reply = Reply('cmpl-1"x', 'model "q"', chat, token_ids, 1_700_000_000)
    for index in (0, 2):  # a request's choices (`n`) each have their own
        events = TokenEvents(reply, index)
        for text, ids in TEXTS:
            got = events.token(text, ids)
            assert got == sse(reply.chunk(text, ids, index=index))
            assert got.startswith(b"data: ") and got.endswith(b"\n\n")
            choice = json.loads(got[6:])["choices"][0]
            assert (choice["delta"]["content"] if chat else choice["text"]) == text and choice["index"] == index
            assert choice.get("token_ids") == (ids if token_ids else None)


class _Client:
    """The ASGI server's side of one response: what was sent, and a disconnect when told."""

    def __init__(self, gone_before_start: bool = False):
        self.sent: list[dict] = []
        self.gone = asyncio.Event()
        self.gone_before_start = gone_before_start

    async def send(self, message: dict) -> None:
        if self.gone_before_start:
            raise OSError("connection reset")
        self.sent.append(message)

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def _source(items: list[bytes], hang: bool, state: dict):
    async def events():
        try:
            for item in items:
                yield item
            if hang:
                await asyncio.Event().wait()  # a token that never comes
        finally:
            state["events_closed"] = True
    return events()


def _run(client: _Client, items: list[bytes], hang: bool = False, disconnect_after_s: float | None = None) -> dict:
    state = {"events_closed": False, "closed": 0}

    async def close() -> None:
        state["closed"] += 1

    async def main() -> None:
        stream = EventStream(_source(items, hang, state), close=close)
        if disconnect_after_s is not None:
            asyncio.get_running_loop().call_later(disconnect_after_s, client.gone.set)
        await asyncio.wait_for(stream({"type": "http"}, client.receive, client.send), 10)

    try:
        asyncio.run(main())
    except OSError:
        state["raised"] = True
    return state


def test_events_go_out_in_order_then_the_end():
    client = _Client()
    state = _run(client, [b"data: 1\n\n", b"data: 2\n\n"])
    assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in client.sent[0]["headers"]
    assert [(m["body"], m["more_body"]) for m in client.sent[1:]] == [
        (b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"", False)]
    assert state["events_closed"] and state["closed"] == 1


def test_a_disconnect_while_no_token_is_due_releases_the_source():
    client = _Client()
    state = _run(client, [b"data: 1\n\n"], hang=True, disconnect_after_s=0.05)
    assert [m["body"] for m in client.sent[1:]] == [b"data: 1\n\n"]  # no end: the client is gone
    assert state["events_closed"] and state["closed"] == 1


def test_a_client_gone_before_the_status_line_still_releases_the_source():
    state = _run(_Client(gone_before_start=True), [b"data: 1\n\n"])
    assert state.get("raised") and state["closed"] == 1
