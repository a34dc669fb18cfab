"""`zeroc bench serve` end to end: real service processes, real gRPC, tiny lengths, every output file.

The harness's numbers are checked against what the stack must do: exact output lengths
(ignore_eos), KV bytes per request from the model's shapes (half for the rank-32 ZeroC model,
none when colocated), and queueing when the decode cache holds one request at a time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from zeroc.bench.serve.netns import netns_unavailable_reason
from zeroc.config import REPO_ROOT

PNG = b"\x89PNG\r\n\x1a\n"
PROMPT = 48  # + BOS = 49 prompt tokens: 4 blocks of 16
OUTPUT = 8
FULL_KV_PER_TOKEN = 6 * 2 * 2 * 64 * 4  # bundled model: layers x (K, V) x KV heads x head dim x fp32


def _bench(tmp_path, *args: str, timeout: float = 1500) -> tuple[dict, dict]:
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "zeroc.cli", "bench", "serve", "--out", str(out), "--json",
                           "--max-prompt-tokens", str(PROMPT), "--max-output-tokens", str(OUTPUT), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = json.loads(done.stdout)
    return printed, json.loads((out / "serve.json").read_text())


def _check_requests(row: dict, n: int) -> None:
    s = row["summary"]
    assert (s["completed"], s["failed"]) == (n, 0), s["errors"]
    assert s["output_tokens"] == n * OUTPUT and s["input_tokens"] == n * (PROMPT + 1)
    for req in row["requests"]:
        assert req["output_tokens"] == OUTPUT and 0 < req["ttft_ms"] <= req["e2e_ms"]


def test_memory_scenario_both_modes_none_and_zeroc(tmp_path, zeroc_half_dir):
    # 64 tokens of uncompressed KV: one 57-token request at a time (two for ZeroC 0.5). The automatic
    # rate, 50 / (JCT of one request alone), sends the 4 requests much faster than they are served.
    printed, report = _bench(
        tmp_path, "--scenario", "memory", "--methods", "none", "zeroc-0.5", "--zeroc-model", f"0.5={zeroc_half_dir}",
        "--modes", "colocated", "disaggregated", "--rate-multipliers", "50", "--num-requests", "4",
        "--cache-requests", str(64 / 2048), "--slo-ttft-ms", "1e9", "--slo-tpot-ms", "0")
    probes = {p["mode"]: p for p in report["probes"]}
    assert set(probes) == {"colocated", "disaggregated"} and all(p["method"] == "none" for p in probes.values())
    rows = {(r["mode"], r["method"]): r for r in report["rows"]}
    for (mode, _), row in rows.items():
        assert row["rate"] == pytest.approx(50 / probes[mode]["jct_s"], rel=0.01)
    assert set(rows) == {(m, k) for m in ("colocated", "disaggregated") for k in ("none", "zeroc-0.5")}
    for (mode, method), row in rows.items():
        _check_requests(row, 4)
        s = row["summary"]
        assert s["goodput"] == pytest.approx(s["request_throughput"])  # a TTFT SLO every request meets, no TPOT SLO
        assert max(r["queue_ms"] for r in row["requests"]) > 0, (mode, method)  # the cache made some wait
        per_request = {r["kv_bytes_received"] for r in row["requests"]}
        if mode == "colocated":
            assert per_request == {0}
        else:  # the prefill side ships all prompt tokens but the last
            full = PROMPT * FULL_KV_PER_TOKEN
            assert per_request == ({full} if method == "none" else {full // 2})
    goals = {g["mode"]: g for g in printed["goals"]}
    assert set(goals) == {"colocated", "disaggregated"} and "jct_cut" in goals["colocated"]
    md = (tmp_path / "report" / "serve.md").read_text()
    assert "## Goals" in md and "| zeroc-0.5 |" in md
    for name in ("serve-latency.png", "serve-throughput.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG
    assert {p["method"] for p in report["skipped"]} == set()  # only the methods asked for


def test_network_scenario_runs_prefill_and_decode_in_namespaces(tmp_path):
    reason = netns_unavailable_reason()
    if reason:
        pytest.fail(f"network namespaces are unavailable here: {reason}")
    _, report = _bench(tmp_path, "--scenario", "network", "--methods", "none", "--links-mbit", "20",
                       "--network-rates", "100", "--num-requests", "3")
    assert "network namespaces" in report["topology"]["network"]
    (row,) = report["rows"]
    assert (row["mode"], row["link_mbit"]) == ("disaggregated", 20)
    _check_requests(row, 3)
    assert {r["kv_bytes_received"] for r in row["requests"]} == {PROMPT * FULL_KV_PER_TOKEN}
    assert (tmp_path / "report" / "serve-network.png").read_bytes()[:8] == PNG
    used = re.findall(r"zcb\d+[pd]", report["topology"]["network"])
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert len(used) == 2 and not set(used) & set(left)  # the run removed its namespaces


def test_target_mode_drives_a_running_service(tmp_path, services):
    printed, report = _bench(tmp_path, "--target", services.colocated, "--workload", "chat", "--rates", "20",
                             "--num-requests", "3")
    (row,) = report["rows"]
    assert (row["scenario"], row["method"]) == ("target", "target")
    _check_requests_chat(row, 3)
    assert printed["goals"] == []


def _check_requests_chat(row: dict, n: int) -> None:
    s = row["summary"]
    assert (s["completed"], s["failed"]) == (n, 0), s["errors"]
    assert all(1 <= r["output_tokens"] <= OUTPUT and r["prompt_tokens"] <= PROMPT + 1 for r in row["requests"])


@pytest.mark.parametrize("args, message", [
    (["--zeroc-model", "half"], "expected BUDGET=DIR"),
    (["--rates", "0"], "request rates must be > 0"),
    (["--arrival", "trace"], "needs --trace"),
    (["--methods", "fp8"], "unknown method"),
    (["--max-output-tokens", "0"], "must be >= 1"),
])
def test_bad_flags_exit_2_before_starting_anything(args, message):
    done = subprocess.run([sys.executable, "-m", "zeroc.cli", "bench", "serve", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 2 and done.stderr.startswith("zeroc: error:") and message in done.stderr
