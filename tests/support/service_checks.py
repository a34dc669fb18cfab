"""Checks on real service processes shared by the end-to-end tests."""

from __future__ import annotations

import time

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
