"""Real service processes for the end-to-end tests: a prefill service and a decode service using it."""

from __future__ import annotations

from collections.abc import Iterator

from zeroc.stack import ServiceProcess


def disaggregated(model_dir: str, decode_env: dict | None = None, env: dict | None = None) -> Iterator[str]:
    """A prefill service and a decode service using it, both serving `model_dir` (both with `env`, the decode
    service also with `decode_env`): yields the decode address, stops both after."""
    procs = []
    try:
        procs.append(ServiceProcess("prefill", ["--model", model_dir], env=env))
        procs.append(ServiceProcess("decode", ["--model", model_dir, "--prefill", procs[0].address],
                                    env={**(env or {}), **(decode_env or {})}))
        for p in procs:
            p.wait_serving()
        yield procs[1].address
    finally:
        for p in procs:
            p.stop()


def colocated(model_dir: str, env: dict | None = None) -> Iterator[str]:
    """A decode service that prefills itself: yields its address, stops it after."""
    proc = ServiceProcess("decode", ["--model", model_dir, "--colocated"], env=env)
    try:
        proc.wait_serving()
        yield proc.address
    finally:
        proc.stop()


def kv_dims(cfg) -> int:
    """K and V dims a token's cache rows hold, summed over every layer and KV head (the ranks, whatever the
    cache's geometry)."""
    return sum(sum(qk) + sum(v) for qk, v in map(cfg.head_ranks, range(cfg.num_hidden_layers)))
