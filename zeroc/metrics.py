"""Prometheus metrics of one service process (docs/metrics.md lists every series).

Each service builds one `ServiceMetrics`: its own `CollectorRegistry` (never the library's global one,
so several services in one process, as in the tests, keep their series apart), the series recorded
as requests happen, and sources read at scrape time (load, cache, KV store) through callables the
service hands over. `serve_metrics` exposes the registry on a port of its own and is closed with the
service. Names follow vLLM's where they mean the same, with the ``zeroc:`` prefix in place of ``vllm:``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zeroc.config import ZeroCError

log = logging.getLogger(__name__)

# vLLM's buckets, so dashboards built for it read these series alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
INDEX_STATES = ("starting", "ok", "degraded")


@dataclass(frozen=True)
class CacheSnapshot:
    """A paged KV cache at scrape time."""

    blocks_total: int
    blocks_free: int
    token_capacity: int  # token slots of the whole cache (GetModelInfo's kv_token_capacity)
    bytes_per_token: float  # what the cache stores per token of context (its KV policy, ranks and dtype)
    dense_bytes_per_token: float  # the same for the uncompressed model's full-precision KV


@dataclass(frozen=True)
class StoreSnapshot:
    """A KV store (prefix reuse) at scrape time; `state` "off" when the service runs without one."""

    state: str
    hit_tokens: int = 0
    lookups: int = 0
    peer_blocks: int = 0
    peer_bytes: int = 0
    blocks_held: int = 0
    capacity_blocks: int = 0
    index_errors: int = 0
    evictions: int = 0


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def load_families(running: int, waiting: int) -> list[Metric]:
    return [gauge("zeroc:num_requests_running", "Requests computing (in a batch) now.", running),
            gauge("zeroc:num_requests_waiting", "Requests accepted that are not computing yet.", waiting)]


def cache_families(c: CacheSnapshot) -> list[Metric]:
    used = 1.0 - c.blocks_free / c.blocks_total if c.blocks_total else 0.0
    return [
        gauge("zeroc:kv_cache_usage_perc", "Fraction of the paged KV cache's blocks in use (1 = full).", used),
        gauge("zeroc:kv_cache_blocks_total", "Blocks of the paged KV cache.", c.blocks_total),
        gauge("zeroc:kv_cache_token_capacity", "Token slots of the whole KV cache (its blocks times their size).",
               c.token_capacity),
        gauge("zeroc:kv_cache_bytes_per_token", "Bytes the KV cache stores per token of context.", c.bytes_per_token),
        gauge("zeroc:kv_cache_compression_ratio", "Full-precision KV bytes per token of the uncompressed model "
               "over the bytes this cache stores per token.",
               c.dense_bytes_per_token / c.bytes_per_token if c.bytes_per_token else 0.0),
    ]


def store_families(s: StoreSnapshot) -> list[Metric]:
    state = GaugeMetricFamily("zeroc:kv_store_index_state", "The KV store's Redis index: 1 for the current state "
                              "(off: no store).", labels=["state"])
    for name in (*INDEX_STATES, "off"):
        state.add_metric([name], 1.0 if s.state == name else 0.0)
    return [
        state,
        counter("zeroc:prefix_cache_hits", "Prompt tokens whose KV came from the KV store (local pool or peers).",
                 s.hit_tokens),
        counter("zeroc:kv_store_lookups", "Prompts looked up in the KV store.", s.lookups),
        counter("zeroc:kv_store_peer_fetch_blocks", "Blocks fetched from peer services.", s.peer_blocks),
        counter("zeroc:kv_store_peer_fetch_bytes", "KV payload bytes fetched from peer services.", s.peer_bytes),
        counter("zeroc:kv_store_index_errors", "Redis index operations that failed.", s.index_errors),
        counter("zeroc:kv_store_evictions", "Blocks evicted from the KV store's pool.", s.evictions),
        gauge("zeroc:kv_store_blocks_held", "Blocks in the KV store's pool.", s.blocks_held),
        gauge("zeroc:kv_store_capacity_blocks", "Blocks the KV store's pool holds at most.", s.capacity_blocks),
    ]


def cache_source(cache, footprint: tuple[float, float]) -> Callable[[], list[Metric]]:
    """Scrape-time series of a paged KV cache (anything with `num_blocks`, `num_free_blocks` and `total_tokens`);
    `footprint`: (bytes per token stored, uncompressed bytes per token), see zeroc.caches.kv_footprint."""
    return lambda: cache_families(CacheSnapshot(cache.num_blocks, cache.num_free_blocks, cache.total_tokens,
                                                *footprint))


class _Sources:
    """A collector calling each source at scrape time; a failing source costs its own series only."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterable[Metric]:
        for source in list(self.sources):
            try:
                yield from source()
            except Exception:  # e.g. a store closing during shutdown: the scrape still answers
                log.debug("a metrics source failed", exc_info=True)


class ServiceMetrics:
    """One service's series. Request paths call the recording methods; `watch` adds scrape-time sources."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("zeroc:time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("zeroc:inter_token_latency_seconds", "Time between two tokens of one request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("zeroc:e2e_request_latency_seconds", "Time from a request's arrival to its end.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("zeroc:request_queue_time_seconds", "Time a request waited for cache space or a "
                                    "batch slot before it first computed.", buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("zeroc:prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter("zeroc:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("zeroc:request_success", "Requests that ended, by finish reason.",
                               ["finished_reason"], registry=r)
        self.kv_transfer = Counter("zeroc:kv_transfer_bytes", "Prompt KV bytes moved between prefill and decode "
                                   "services, by transport and direction.", ["transport", "direction"], registry=r)
        self._sources = _Sources()
        r.register(self._sources)

    def watch(self, source: Callable[[], Iterable[Metric]]) -> None:
        """Read `source()` (metric families) at every scrape."""
        self._sources.sources.append(source)

    def finished(self, reason: str, e2e_s: float) -> None:
        self.success.labels(reason).inc()
        self.e2e.observe(e2e_s)

    def kv_bytes(self, transport: str, direction: str, n: int) -> None:
        if n:
            self.kv_transfer.labels(transport, direction).inc(n)


class TokenClock:
    """One request's token timing: the first token observes TTFT, each later one an inter-token gap, so a request
    of n tokens observes n - 1 gaps. Tokens sent together (a stream that fell behind its engine gets the steps
    queued meanwhile in one message) share the time since the last message evenly; those sent with the first token
    arrived with it (a gap of 0)."""

    def __init__(self, metrics: ServiceMetrics, arrived: float):
        self.metrics, self.arrived, self.last = metrics, arrived, None

    def tokens(self, n: int, now: float) -> None:
        if not n:
            return
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrived)
            gaps = [0.0] * (n - 1)
        else:
            gaps = [(now - self.last) / n] * n
        for gap in gaps:
            self.metrics.itl.observe(gap)
        self.last = now
        self.metrics.generation_tokens.inc(n)


class MetricsServer:
    """GET /metrics of one registry on HOST:PORT, served by a thread of its own until `close`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = self._httpd.server_address[1]
        self._closed = threading.Event()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)


def serve_metrics(metrics: ServiceMetrics, host: str, port: int) -> MetricsServer | None:
    """The metrics endpoint on `port` (None when 0: off). ZeroCError (a one-line CLI error) if it cannot listen."""
    if not port:
        return None
    try:
        return MetricsServer(metrics.registry, host, port)
    except OSError as exc:
        raise ZeroCError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
