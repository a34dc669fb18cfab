"""TTFT, TPOT, ITL, JCT, throughput and goodput against hand-checkable event timelines."""

from __future__ import annotations

import pytest

from zeroc.bench.serve.metrics import SLO, Dist, RequestRecord, summarize


def _rec(index, sent, chunks, done, prompt=10, **kw) -> RequestRecord:
    """chunks: (arrival time, tokens in that message)."""
    return RequestRecord(index, prompt, sum(n for _, n in chunks), sent, sent_s=sent,
                         chunk_s=[t for t, _ in chunks], chunk_tokens=[n for _, n in chunks], done_s=done, **kw)


def test_one_request_timeline():
    # sent at 1.0; messages at 1.5 (1 token), 1.7 (1), 2.0 (2), 2.1 (1); final message at 2.2.
    rec = _rec(0, 1.0, [(1.5, 1), (1.7, 1), (2.0, 2), (2.1, 1)], 2.2)
    assert rec.output_tokens == 5
    assert rec.ttft_s == pytest.approx(0.5)
    assert rec.e2e_s == pytest.approx(1.2)
    assert rec.tpot_s == pytest.approx((1.2 - 0.5) / 4)  # the 4 tokens after the first
    assert rec.itl_s == pytest.approx([0.2, 0.3, 0.1])  # per message, as vllm bench serve counts them
    one = _rec(1, 0.0, [(0.3, 1)], 0.35)
    assert one.tpot_s == 0.0 and one.itl_s == []


def test_summary_over_a_run():
    recs = [
        _rec(0, 0.0, [(0.5, 1), (1.0, 1), (1.5, 1)], 1.5, prompt=100, kv_bytes_received=600, queue_ms=0.0),
        _rec(1, 1.0, [(3.0, 1), (3.2, 1), (3.4, 1)], 3.5, prompt=50, kv_bytes_received=300, queue_ms=1500.0,
             cached_prefix_tokens=25, preemptions=2),
        _rec(2, 2.0, [(2.4, 1), (2.8, 1), (3.2, 1), (3.6, 1), (4.0, 1)], 4.0, prompt=50, queue_ms=100.0),
        RequestRecord(3, 70, 5, 2.5, sent_s=2.5, error="UNAVAILABLE: down"),
    ]
    s = summarize(recs, SLO(ttft_ms=600, tpot_ms=300))
    assert (s.completed, s.failed, s.errors) == (3, 1, ["UNAVAILABLE: down"])
    assert s.duration_s == pytest.approx(4.0)  # first send 0.0 .. last completion 4.0
    assert (s.input_tokens, s.output_tokens) == (200, 11)  # the failed request counts nowhere
    assert s.request_throughput == pytest.approx(3 / 4.0)
    assert s.output_throughput == pytest.approx(11 / 4.0)
    assert s.total_token_throughput == pytest.approx(211 / 4.0)
    # TTFTs 0.5, 2.0, 0.4 s; TPOTs (1.5-0.5)/2 = 0.5, (2.5-2.0)/2 = 0.25, (2.0-0.4)/4 = 0.4 s.
    assert s.ttft.mean == pytest.approx((500 + 2000 + 400) / 3) and s.ttft.median == pytest.approx(500)
    assert s.tpot.mean == pytest.approx((500 + 250 + 400) / 3) and s.tpot.median == pytest.approx(400)
    assert s.e2e.mean == pytest.approx((1500 + 2500 + 2000) / 3) and s.e2e.median == pytest.approx(2000)
    # ITLs pooled: 0.5 0.5 | 0.2 0.2 | 0.4 0.4 0.4 0.4.
    assert s.itl.mean == pytest.approx(3000 / 8) and s.itl.median == pytest.approx(400)
    # TTFT <= 600 ms holds for requests 0 and 2, but their TPOTs (500, 400 ms) miss 300 ms.
    assert s.goodput == 0.0 and s.slo_attainment == 0.0
    relaxed = summarize(recs, SLO(ttft_ms=600, tpot_ms=450))  # requests 2 (0.4 s, 400 ms) only
    assert relaxed.goodput == pytest.approx(1 / 4.0) and relaxed.slo_attainment == pytest.approx(1 / 4)
    assert summarize(recs, SLO(e2e_ms=2000)).goodput == pytest.approx(2 / 4.0)  # JCTs 1.5 and 2.0 s
    assert summarize(recs).goodput == pytest.approx(3 / 4.0)  # no SLO: every completed request counts
    assert (s.kv_bytes_total, s.kv_bytes_per_request) == (900, 300)
    assert s.prefix_hit_rate == pytest.approx(25 / 200)
    assert s.preemptions == 2
    assert s.queue.mean == pytest.approx(1600 / 3) and s.queue.median == pytest.approx(100)


def test_percentiles_interpolate_like_numpy_linear():
    d = Dist.of_seconds([0.001 * v for v in range(1, 101)])  # 1 .. 100 ms
    assert (d.mean, d.median) == pytest.approx((50.5, 50.5))
    assert d.p90 == pytest.approx(1 + 0.9 * 99) and d.p99 == pytest.approx(1 + 0.99 * 99)
    assert Dist.of_seconds([]) == Dist(0.0, 0.0, 0.0, 0.0)


def test_a_run_with_nothing_completed_has_zero_rates():
    s = summarize([RequestRecord(0, 5, 5, 0.0, error="DEADLINE_EXCEEDED: slow")])
    assert (s.completed, s.request_throughput, s.goodput, s.duration_s) == (0, 0.0, 0.0, 0.0)


def test_slo_values_must_be_positive():
    with pytest.raises(ValueError, match="ttft_ms"):
        SLO(ttft_ms=0)
