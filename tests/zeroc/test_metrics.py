"""zeroc/metrics.py's token clock: one TTFT and n - 1 inter-token gaps per request of n tokens, however they are
grouped into messages."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from zeroc.metrics import ServiceMetrics, TokenClock


def _series(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


def test_tokens_sent_together_share_the_gap_and_count_one_each():
    metrics = ServiceMetrics()
    registry = metrics.registry
    clock = TokenClock(metrics, arrived=10.0)
    clock.tokens(2, 10.5)  # the first token and one more in one message: TTFT 0.5, a gap of 0
    clock.tokens(0, 10.7)  # text only: nothing observed
    clock.tokens(1, 11.0)
    clock.tokens(3, 12.5)  # a stream that fell behind: 1.5 s over 3 tokens
    itl = "zeroc:inter_token_latency_seconds"
    assert _series(registry, "zeroc:time_to_first_token_seconds_count") == 1
    assert _series(registry, "zeroc:time_to_first_token_seconds_sum") == 0.5
    assert _series(registry, itl + "_count") == 6 - 1
    assert abs(_series(registry, itl + "_sum") - (0.0 + 0.5 + 1.5)) < 1e-9
    assert _series(registry, "zeroc:generation_tokens_total") == 6
