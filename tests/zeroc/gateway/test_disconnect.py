"""A client that goes away cancels its gRPC call: the decode service frees the request's KV blocks at once.

"At once" is measured against the request's own pace: each one asks for ~2000 tokens, and the blocks
must be free in well under half the time the rest of the generation would have taken.
"""

from __future__ import annotations

import json
import socket
import time

from zeroc.client import Client

from gateway_support import running, wait_idle

LONG = {"model": "zeroc-tiny", "prompt": "import os", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


def send(address: str, body: dict) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=120)
    raw = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
    return sock


def read_events(sock: socket.socket, n: int, buf: bytearray) -> float:
    """Read until `buf` holds `n` server-sent events; returns the time the last one arrived."""
    while buf.count(b"data: ") < n:
        data = sock.recv(65536)
        assert data, f"stream ended early: {bytes(buf[-300:])!r}"
        buf += data
    return time.monotonic()


def assert_freed_in_time(gateway, closed: float, rest_s: float) -> None:
    """Every replica idle, with all its blocks free, within half the `rest_s` the rest would have taken."""
    took = wait_idle(gateway.targets, timeout_s=max(rest_s / 2, 1.0))
    assert time.monotonic() - closed < rest_s / 2, (took, rest_s)


def test_closed_streams_free_their_blocks_on_every_replica(gateway):
    socks = [send(gateway.address, {**LONG, "stream": True}) for _ in range(2)]
    bufs = [bytearray(), bytearray()]
    try:
        for s, b in zip(socks, bufs):
            read_events(s, 2, b)
        t0 = read_events(socks[0], 4, bufs[0])
        t1 = read_events(socks[0], 12, bufs[0])
        assert b"HTTP/1.1 200" in bufs[0] and b"text/event-stream" in bufs[0]
        per_token = (t1 - t0) / 8
        # Consecutive requests go to the two replicas in turn: one each.
        assert running(gateway.targets) == [1, 1]
    finally:
        closed = time.monotonic()
        for s in socks:
            s.close()
    assert_freed_in_time(gateway, closed, (LONG["max_tokens"] - 12) * per_token)


def test_a_closed_stream_of_several_choices_frees_every_choices_blocks(gateway):
    """`n` = 3: three decode calls, spread over both replicas; closing the stream cancels all three."""
    sock = send(gateway.address, {**LONG, "stream": True, "n": 3, "temperature": 1.0, "seed": 1})
    buf = bytearray()
    try:
        t0 = read_events(sock, 6, buf)
        t1 = read_events(sock, 30, buf)
        assert sum(running(gateway.targets)) == 3 and min(running(gateway.targets)) >= 1
        assert {json.loads(e[6:])["choices"][0]["index"] for e in bytes(buf).split(b"\n")
                if e.startswith(b"data: {")} >= {0, 1, 2}
        per_token = (t1 - t0) / 8  # 24 events, 3 choices: 8 steps
    finally:
        closed = time.monotonic()
        sock.close()
    assert_freed_in_time(gateway, closed, (LONG["max_tokens"] - 10) * per_token)


def test_a_client_gone_before_its_whole_completion_frees_the_blocks(gateway):
    with Client(gateway.targets[0], timeout=120) as c:
        started = time.monotonic()
        c.generate("import os", max_tokens=40, ignore_eos=True)
        per_token = (time.monotonic() - started) / 40
    sock = send(gateway.address, LONG)  # not streamed: nothing comes back until the end
    try:
        deadline = time.monotonic() + 60
        while sum(running(gateway.targets)) != 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    finally:
        closed = time.monotonic()
        sock.close()
    assert_freed_in_time(gateway, closed, (LONG["max_tokens"] - 40) * per_token)
