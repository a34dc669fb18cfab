"""Checks on real service processes shared by the end-to-end tests."""

from __future__ import annotations

import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from zeroc.client import Client


def wait_until(predicate, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def assert_no_leak(target: str) -> None:
    """Every KV block is free again and nothing is running or queued."""
    with Client(target) as c:
        def idle():
            info = c.model_info()
            return (info.kv_blocks_free == info.kv_blocks_total and info.requests_running == 0
                    and info.requests_queued == 0)
        wait_until(idle)


def free_port() -> int:
    """A loopback port free now (for services whose port cannot be 0, e.g. the metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One GET /metrics, parsed with prometheus_client's own parser: samples by name and labels."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def __call__(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled series not created yet (a counter that never moved)."""
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples or labels, f"{name} is not exposed"
        return self.samples.get(key, 0.0)
