"""`zeroc bench gateway` against the session's real decode service and gateway: both backends produce the
same token counts (prompts are BOS + 16 text tokens) and sane timings (no speed is asserted: that is what
the benchmark reports)."""

from __future__ import annotations

import asyncio
import json

from zeroc.bench.gateway import HttpConnections, _openai_send
from zeroc.bench.serve.metrics import RequestRecord
from zeroc.bench.serve.workloads import BenchRequest
from zeroc.cli import main
from zeroc.config import BUNDLED_MODEL


def test_bench_gateway_measures_both_backends_side_by_side(gateway, capsys):
    assert main(["bench", "gateway", "--target", gateway.targets[1], "--gateway", gateway.address,
                 "--requests", "4", "--concurrency", "2", "--prompt-tokens", "16", "--output-tokens", "5",
                 "--rounds", "2", "--pairs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["rounds"]) == 2 and len(report["pairs"]) == 2
    for row in report["rounds"]:
        for backend in ("grpc", "openai"):
            s = row[backend]
            assert s["completed"] == 4 and s["failed"] == 0 and s["output_tokens"] == 20
            assert s["input_tokens"] == 4 * (1 + 16) and 0 < s["ttft"]["median"] < s["e2e"]["median"]
    assert report["throughput_ratio"] > 0 and set(report["unloaded_ttft_ms"]) == {"grpc", "openai"}
    assert len(report["throughput_ratios"]) == len(report["ttft_p50_deltas_ms"]) == 2
    assert set(report["backends"]["openai"]["cpu_us_per_token"]) == {"client"}  # services given by address


def test_bench_http_client_keeps_its_connection_alive(gateway):
    """Requests in turn share one connection, each read to its end (an unread trailer would break the next)."""
    async def three() -> tuple[list[RequestRecord], int]:
        pool = HttpConnections(gateway.address)
        records = []
        for i in range(3):
            rec = RequestRecord(i, 4, 3, 0.0)
            await _openai_send(pool, BenchRequest([1, 5 + i, 6, 7], 3), rec, 0.0, BUNDLED_MODEL.resolve().name)
            records.append(rec)
        pool.close()
        return records, pool.opened

    records, opened = asyncio.run(three())
    assert opened == 1
    for rec in records:
        assert rec.ok and sum(rec.chunk_tokens) == 3 and rec.done_s > 0, rec.error
