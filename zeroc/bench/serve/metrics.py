"""Per-request timelines and the metrics `vllm bench serve` reports, computed from them.

Definitions (times on the client, from the moment a request is sent):
- TTFT: until the first streamed token;
- TPOT (per request): (E2E latency - TTFT) / (output tokens - 1), 0 for one-token outputs;
- ITL: the gaps between consecutive streamed messages that carry tokens (all requests pooled);
- E2E latency (JCT): until the final message;
- throughput: completed requests, output tokens and all tokens per second of the run (from the
  first send to the last completion);
- goodput: completed requests per second that met every SLO given (TTFT, TPOT, E2E).
Server-side counts come from the final usage message: KV bytes received from prefill, prompt
tokens served from a prefix cache, time queued for KV space or a batch slot, and preemptions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """What the client saw of one request; times are seconds from the start of the run."""

    index: int
    prompt_tokens: int
    max_tokens: int
    scheduled_s: float  # planned arrival
    sent_s: float = 0.0
    chunk_s: list[float] = field(default_factory=list)  # arrival of each message with tokens
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those messages
    done_s: float | None = None
    error: str | None = None
    cached_prefix_tokens: int = 0
    kv_bytes_received: int = 0
    queue_ms: float = 0.0
    preemptions: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None and bool(self.chunk_s)

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float:
        return self.chunk_s[0] - self.sent_s

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.sent_s

    @property
    def tpot_s(self) -> float:
        n = self.output_tokens
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else 0.0

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput, in milliseconds; None = not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be > 0 ms, got {value!r}")

    def met(self, rec: RequestRecord) -> bool:
        return ((self.ttft_ms is None or rec.ttft_s * 1000 <= self.ttft_ms)
                and (self.tpot_ms is None or rec.tpot_s * 1000 <= self.tpot_ms)
                and (self.e2e_ms is None or rec.e2e_s * 1000 <= self.e2e_ms))


@dataclass(frozen=True)
class Dist:
    """mean / median / p90 / p99 of a sample, in milliseconds (all 0 for an empty sample)."""

    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> "Dist":
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(values, dtype=float) * 1000
        return cls(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 90)),
                   float(np.percentile(ms, 99)))


@dataclass(frozen=True)
class Summary:
    """The metrics of one run (one method, mode, workload and load)."""

    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output tokens) / s
    goodput: float  # requests / s meeting every SLO
    slo_attainment: float  # fraction of all requests meeting every SLO
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist  # job completion time
    queue: Dist  # server-reported wait for KV space or a batch slot
    kv_bytes_total: int
    kv_bytes_per_request: float
    prefix_hit_rate: float  # prompt tokens served from a prefix cache / prompt tokens
    preemptions: int
    errors: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: list[RequestRecord], slo: SLO = SLO()) -> Summary:
    """The run's metrics from its request timelines."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    if records and done:
        start = min(r.sent_s for r in records)
        duration = max(r.done_s for r in done) - start
    else:
        duration = 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    inputs = sum(r.prompt_tokens for r in done)
    outputs = sum(r.output_tokens for r in done)
    good = sum(1 for r in done if slo.met(r))
    kv = sum(r.kv_bytes_received for r in done)
    return Summary(
        completed=len(done), failed=len(failed), duration_s=duration, input_tokens=inputs, output_tokens=outputs,
        request_throughput=per_s(len(done)), output_throughput=per_s(outputs),
        total_token_throughput=per_s(inputs + outputs), goodput=per_s(good),
        slo_attainment=good / len(records) if records else 0.0,
        ttft=Dist.of_seconds([r.ttft_s for r in done]), tpot=Dist.of_seconds([r.tpot_s for r in done]),
        itl=Dist.of_seconds([g for r in done for g in r.itl_s]), e2e=Dist.of_seconds([r.e2e_s for r in done]),
        queue=Dist.of_seconds([r.queue_ms / 1000 for r in done]),
        kv_bytes_total=kv, kv_bytes_per_request=kv / len(done) if done else 0.0,
        prefix_hit_rate=sum(r.cached_prefix_tokens for r in done) / inputs if inputs else 0.0,
        preemptions=sum(r.preemptions for r in done),
        errors=sorted({r.error or "no tokens" for r in failed}),
    )
