"""Arrival times of a load test: Poisson, gamma (bursty) or a recorded trace.

All generators return offsets in seconds from the start of the run, ascending, starting after 0.
Gamma inter-arrival gaps with shape k and mean 1/rate have a coefficient of variation 1/sqrt(k):
`burstiness` is k, as in `vllm bench serve` (1 = Poisson, < 1 burstier, > 1 smoother).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zeroc.config import ZeroCError


@dataclass(frozen=True)
class TraceEntry:
    """One request of a JSONL trace: when it arrives and, optionally, its lengths."""

    timestamp: float  # seconds, any origin; the first entry is shifted to 0
    prompt_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True)
class LoadSpec:
    """How requests arrive: `kind` poisson | gamma at `rate` requests/s, or trace (`trace` file).

    The run sends `num_requests` requests or, if `duration_s` is set, every arrival before
    `duration_s` instead; a trace run replays the trace (at most `num_requests` entries, and only
    those before `duration_s` if set).
    """

    kind: str = "poisson"
    rate: float = 1.0
    burstiness: float = 1.0
    num_requests: int = 32
    duration_s: float | None = None
    trace: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "gamma", "trace"):
            raise ValueError(f"arrival kind must be poisson, gamma or trace, got {self.kind!r}")
        if self.kind == "trace" and not self.trace:
            raise ValueError("a trace load needs a trace file")
        if self.kind != "trace" and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"request rate must be a positive number of requests/s, got {self.rate!r}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration_s!r}")


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` arrival offsets of a Poisson process with `rate` events/s: [n]."""
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def gamma_arrivals(rate: float, burstiness: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` arrival offsets with gamma gaps: mean 1/rate, CV 1/sqrt(burstiness): [n]."""
    return np.cumsum(rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n))


def read_trace(path: str | Path) -> list[TraceEntry]:
    """Parse a JSONL trace: one object per line with "timestamp" (seconds) and optional
    "prompt_tokens" / "output_tokens". Raises ZeroCError naming the file and line."""
    entries: list[TraceEntry] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ZeroCError(f"cannot read trace {path}: {exc.strerror}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entry = TraceEntry(float(raw["timestamp"]), _opt_int(raw.get("prompt_tokens")),
                               _opt_int(raw.get("output_tokens")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ZeroCError(f"{path}:{no}: expected a JSON object with a numeric \"timestamp\" ({exc})") from None
        if not math.isfinite(entry.timestamp):
            raise ZeroCError(f"{path}:{no}: timestamp must be finite")
        entries.append(entry)
    if not entries:
        raise ZeroCError(f"trace {path} has no entries")
    entries.sort(key=lambda e: e.timestamp)
    origin = entries[0].timestamp
    return [TraceEntry(e.timestamp - origin, e.prompt_tokens, e.output_tokens) for e in entries]


def _opt_int(value) -> int | None:
    if value is None:
        return None
    if int(value) < 1:
        raise ValueError("token counts must be >= 1")
    return int(value)


def arrivals(spec: LoadSpec) -> tuple[np.ndarray, list[TraceEntry] | None]:
    """Arrival offsets for `spec` (and the trace entries they came from, for a trace): [n]."""
    if spec.kind == "trace":
        entries = read_trace(spec.trace)[:spec.num_requests]
        if spec.duration_s is not None:
            entries = [e for e in entries if e.timestamp < spec.duration_s] or entries[:1]
        return np.array([e.timestamp for e in entries]), entries
    rng = np.random.default_rng(spec.seed)
    # A duration-bound run draws until the duration is passed (the expected count plus slack, topped up).
    n = spec.num_requests if spec.duration_s is None else max(1, int(spec.rate * spec.duration_s * 1.5) + 10)
    draw = (lambda k: poisson_arrivals(spec.rate, k, rng)) if spec.kind == "poisson" else \
        (lambda k: gamma_arrivals(spec.rate, spec.burstiness, k, rng))
    times = draw(n)
    if spec.duration_s is not None:
        while times[-1] < spec.duration_s:
            times = np.concatenate([times, times[-1] + draw(n)])
        times = times[times < spec.duration_s]
        if times.size == 0:
            raise ZeroCError(f"no request arrives within {spec.duration_s} s at {spec.rate} requests/s")
    return times, None
