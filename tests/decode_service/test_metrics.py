"""The Prometheus endpoints of real service processes (prefill, decode, gateway) scraped under load: the
named series exist and move consistently with what the clients received."""

from __future__ import annotations

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli_runs import zeroc
from gateway_support import start_gateway
from service_checks import Scrape, assert_no_leak, free_port, wait_until
from zeroc.client import Client
from zeroc.config import ZeroCConfig
from zeroc.metrics import ServiceMetrics
from zeroc.stack import ServiceProcess

# The names other parts of the project rely on (the HPA of deploy/k8s, docs/metrics.md).
DECODE_SERIES = {
    "zeroc:time_to_first_token_seconds_count", "zeroc:inter_token_latency_seconds_count",
    "zeroc:e2e_request_latency_seconds_count", "zeroc:request_queue_time_seconds_count",
    "zeroc:num_requests_running", "zeroc:num_requests_waiting", "zeroc:kv_cache_usage_perc",
    "zeroc:num_preemptions_total", "zeroc:prompt_tokens_total", "zeroc:generation_tokens_total",
    "zeroc:prefix_cache_hits_total", "zeroc:kv_store_peer_fetch_bytes_total", "zeroc:kv_store_index_state",
    "zeroc:kv_cache_compression_ratio", "zeroc:kv_cache_bytes_per_token", "zeroc:kv_cache_token_capacity",
    "zeroc:kv_transfer_bytes_total",
}
PREFILL_SERIES = {"zeroc:num_requests_running", "zeroc:num_requests_waiting", "zeroc:kv_cache_usage_perc",
                  "zeroc:prompt_tokens_total", "zeroc:request_prefill_time_seconds_count",
                  "zeroc:kv_transfer_bytes_total", "zeroc:prefix_cache_hits_total", "zeroc:kv_store_index_state"}
ROOT = Path(__file__).resolve().parents[2]
LONG_PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 2


@pytest.fixture(scope="module")
def stack():
    ports = {"prefill": free_port(), "decode": free_port(), "gateway": free_port()}
    procs: list[ServiceProcess] = []
    try:
        procs.append(ServiceProcess("prefill", ["--metrics-port", str(ports["prefill"])]))
        # The decode service takes its port from the environment, the others from the flag.
        procs.append(ServiceProcess("decode", ["--prefill", procs[0].internal_address, "--kv-transport", "grpc"],
                                    env={"ZEROC_METRICS_PORT": str(ports["decode"])}))
        for p in procs:
            p.wait_serving()
        gateway = start_gateway(procs[1].address, args=("--metrics-port", str(ports["gateway"])))
        procs.append(gateway.process)
        yield SimpleNamespace(decode=procs[1].address, gateway=gateway, ports=ports)
    finally:
        for p in reversed(procs):
            p.stop()


def _load_snapshot(target: str, port: int) -> Scrape:
    """Three long streams in flight (each has its first token): scraped, then cancelled."""
    with Client(target, timeout=60) as c:
        streams = [c.stream(f"Count to a thousand, take {i}:", max_tokens=1000, ignore_eos=True) for i in range(3)]
        for s in streams:
            next(s)
        busy = Scrape(port)
        for s in streams:
            s.close()  # cancels the call: the service frees its blocks
    return busy


def test_decode_series_under_load_move_with_what_clients_received(stack):
    port = stack.ports["decode"]
    busy = _load_snapshot(stack.decode, port)
    assert DECODE_SERIES <= busy.names()
    assert busy("zeroc:num_requests_running") + busy("zeroc:num_requests_waiting") == 3
    assert 0 < busy("zeroc:kv_cache_usage_perc") < 1
    assert_no_leak(stack.decode)
    before = Scrape(port)
    assert before("zeroc:kv_cache_usage_perc") == 0 and before("zeroc:num_requests_running") == 0

    with Client(stack.decode, timeout=60) as c:
        first = c.generate(LONG_PROMPT, max_tokens=5, ignore_eos=True)
        wait_until(lambda: Scrape(port)("zeroc:kv_store_blocks_held") > 0, 30)  # the prompt's blocks are kept
        prompts = [LONG_PROMPT] + [f"Question {i}: what is {i} squared?" for i in range(5)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = [first, *pool.map(lambda p: c.generate(p, max_tokens=9, ignore_eos=True), prompts)]
        info = c.model_info()
    after = Scrape(port)

    def moved(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    n, tokens = len(results), sum(len(r.token_ids) for r in results)
    assert moved("zeroc:generation_tokens_total") == tokens == 5 + 6 * 9
    assert moved("zeroc:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results)
    assert moved("zeroc:time_to_first_token_seconds_count") == n
    assert moved("zeroc:e2e_request_latency_seconds_count") == n
    assert moved("zeroc:request_queue_time_seconds_count") == n
    assert moved("zeroc:inter_token_latency_seconds_count") == tokens - n  # one token per step per request
    assert moved("zeroc:request_success_total", finished_reason="length") == n
    assert moved("zeroc:kv_transfer_bytes_total", transport="grpc", direction="received") == \
        sum(r.usage.kv_bytes_received for r in results) > 0
    hits = sum(r.usage.cached_prefix_tokens for r in results)
    assert moved("zeroc:prefix_cache_hits_total") == hits > 0  # the repeated prompt reused its prefix
    assert after("zeroc:kv_store_index_state", state="ok") == 1
    assert after("zeroc:kv_cache_token_capacity") == info.kv_token_capacity == info.kv_blocks_total * info.kv_block_size
    assert after("zeroc:kv_cache_compression_ratio") == 1.0  # the bundled model, full-precision cache
    assert after("zeroc:num_requests_running") == after("zeroc:num_requests_waiting") == 0
    _check_docs_and_dashboard(after.names())


def _check_docs_and_dashboard(exposed: set[str]) -> None:
    """docs/metrics.md documents every series the service exposes; the Grafana dashboard queries only those."""
    documented = set(re.findall(r"zeroc:[a-z0-9_]+", (ROOT / "docs/metrics.md").read_text()))
    for name in exposed:
        base = re.sub(r"_(bucket|count|sum|created)$", "", name)
        assert name.endswith("_created") or {name, base} & documented, f"{name} is not in docs/metrics.md"
    dashboard = json.loads((ROOT / "deploy/grafana/zeroc.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {n for e in exprs for n in re.findall(r"zeroc:[a-z0-9_]+", e)}
    assert queried and queried <= exposed, queried - exposed


def test_prefill_series_and_the_bytes_both_sides_count(stack):
    with Client(stack.decode, timeout=60) as c:
        c.generate("A prompt for the prefill service to compute", max_tokens=2, ignore_eos=True)
    prefill, decode = Scrape(stack.ports["prefill"]), Scrape(stack.ports["decode"])
    assert PREFILL_SERIES <= prefill.names()
    sent = prefill("zeroc:kv_transfer_bytes_total", transport="grpc", direction="sent")
    assert sent == decode("zeroc:kv_transfer_bytes_total", transport="grpc", direction="received") > 0
    assert prefill("zeroc:request_prefill_time_seconds_count") >= 1
    assert prefill("zeroc:num_requests_running") == prefill("zeroc:num_requests_waiting") == 0


def test_gateway_series_count_what_its_http_clients_got(stack):
    gw, port = stack.gateway, stack.ports["gateway"]
    bodies = [{"prompt": f"Item {i}:", "max_tokens": 4 + i, "ignore_eos": True} for i in range(3)]
    replies = []
    threads = [threading.Thread(target=lambda b=b: replies.append(gw.post("/v1/completions", b))) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [status for status, _ in replies] == [200] * 3
    got = Scrape(port)
    assert got("zeroc:generation_tokens_total") == sum(r["usage"]["completion_tokens"] for _, r in replies) == 15
    assert got("zeroc:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for _, r in replies)
    assert got("zeroc:time_to_first_token_seconds_count") == got("zeroc:e2e_request_latency_seconds_count") == 3
    assert got("zeroc:request_success_total", finished_reason="length") == 3
    assert got("zeroc:num_requests_running") == 0


def test_registries_are_per_service_and_the_port_setting_is_checked():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.generation_tokens.inc(3)
    assert a.registry.get_sample_value("zeroc:generation_tokens_total") == 3
    assert b.registry.get_sample_value("zeroc:generation_tokens_total") == 0
    assert ZeroCConfig.from_env({"ZEROC_METRICS_PORT": "9400"}).metrics.port == 9400
    assert ZeroCConfig.from_env({}).metrics.port == 0  # off unless asked for
    with pytest.raises(ValueError, match="metrics port"):
        ZeroCConfig.from_env({"ZEROC_METRICS_PORT": "70000"})


def test_a_taken_metrics_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = zeroc("serve", "decode", "--colocated", "--port", "0", "--redis-url", "off",
                     "--metrics-port", str(taken.getsockname()[1]))
    assert done.returncode == 2 and "cannot serve metrics on 127.0.0.1:" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
