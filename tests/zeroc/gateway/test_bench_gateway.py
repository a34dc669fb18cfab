"""`zeroc bench gateway` against the session's real decode service and gateway: both backends produce the
same token counts (prompts are BOS + 16 text tokens) and sane timings (no speed is asserted: that is what
the benchmark reports)."""

from __future__ import annotations

import json

from zeroc.cli import main


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
