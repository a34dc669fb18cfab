"""Helpers of the gateway tests: the gateway as a real process, plain HTTP calls, decode services' load."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from dataclasses import dataclass
from typing import Iterator

from zeroc.client import Client
from zeroc.stack import ServiceProcess, wait_http


@dataclass
class Gateway:
    address: str  # HOST:PORT
    targets: list[str]
    process: ServiceProcess

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def post(self, path: str, body: bytes | dict | str, headers: dict | None = None) -> tuple[int, dict | str]:
        """One request on a fresh connection: (status, parsed JSON body or raw text)."""
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
            reply = conn.getresponse()
            text = reply.read().decode()
        finally:
            conn.close()
        try:
            return reply.status, json.loads(text)
        except ValueError:
            return reply.status, text


def start_gateway(*targets: str, args: tuple[str, ...] = ()) -> Gateway:
    proc = ServiceProcess("gateway", [*args, *(a for t in targets for a in ("--target", t))], start_timeout_s=60)
    try:
        wait_http(proc.address, 60)
    except BaseException:
        proc.stop()
        raise
    return Gateway(proc.address, list(targets), proc)


@contextlib.contextmanager
def openai_on_gateway(target: str, *args: str) -> Iterator:
    """The official `openai` client on a gateway of its own in front of `target`, started with `args` (a parser)."""
    import openai

    gw = start_gateway(target, args=args)
    try:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            yield client
    finally:
        gw.process.stop()


def wait_idle(targets: list[str], timeout_s: float) -> float:
    """Wait until every target holds no request and all its KV blocks are free; returns the seconds taken."""
    started = time.monotonic()
    clients = [Client(t, timeout=10) for t in targets]
    try:
        while True:
            infos = [c.model_info() for c in clients]
            if all(i.kv_blocks_free == i.kv_blocks_total and i.requests_running == 0 and i.requests_queued == 0
                   for i in infos):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout_s, f"still busy after {timeout_s} s: {infos}"
            time.sleep(0.05)
    finally:
        for c in clients:
            c.close()


def running(targets: list[str]) -> list[int]:
    out = []
    for t in targets:
        with Client(t, timeout=10) as c:
            out.append(c.model_info().requests_running)
    return out
