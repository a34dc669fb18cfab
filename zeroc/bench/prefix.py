"""`zeroc bench prefix`: what prefix reuse buys, and what the index costs.

1. TTFT cold vs warm through real service processes (one prefill, one disaggregated decode, one
   colocated decode, one embedded Redis): per round a fresh prefix of `shared` x `tokens` prompt
   tokens; the cold prompt is the prefix plus one suffix, the warm prompt the same prefix plus
   another suffix, sent right after. Both are measured in the same run, side by side.
2. Index operations against an embedded Redis: lookup of a 64-block chain held by two holders,
   put of 64 entries, touch; latency percentiles on one connection and throughput of lookups
   from several threads.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from tqdm import tqdm

from kv_store.embedded import EmbeddedRedis
from kv_store.index import BlockEntry, RedisBlockIndex
from zeroc.config import BUNDLED_HELDOUT, BUNDLED_MODEL


@dataclass(frozen=True)
class PrefixBenchSpec:
    tokens: int = 1024  # prompt length
    shared: float = 0.9  # fraction of the prompt that is the shared prefix
    rounds: int = 3
    index_ops: int = 2000  # operations per index measurement

    def __post_init__(self) -> None:
        if self.tokens < 32 or not 0 < self.shared < 1 or self.rounds < 1 or self.index_ops < 10:
            raise ValueError("tokens must be >= 32, shared in (0, 1), rounds >= 1, index_ops >= 10")


def _ttft_ms(client, prompt: list[int]) -> tuple[float, int]:
    """Client-side time to the first token, and the prefix tokens the service reused."""
    start = time.perf_counter()
    first = None
    usage = None
    for item in client.stream(prompt, max_tokens=2, ignore_eos=True):
        if first is None and getattr(item, "token_ids", None):
            first = time.perf_counter()
        usage = getattr(item, "usage", usage)
    return (first - start) * 1000, usage.cached_prefix_tokens


def _prompts(ids: list[int], spec: PrefixBenchSpec, round_: int, mode: int) -> tuple[list[int], list[int]]:
    n_shared = int(spec.tokens * spec.shared)
    n_suffix = spec.tokens - n_shared
    start = (round_ * 2 + mode) * (spec.tokens + 2 * n_suffix)  # a fresh slice per round and mode
    prefix = ids[start:start + n_shared]
    a = ids[start + n_shared:start + n_shared + n_suffix]
    b = ids[start + n_shared + n_suffix:start + n_shared + 2 * n_suffix]
    return prefix + a, prefix + b


def bench_ttft(spec: PrefixBenchSpec, progress: bool = True) -> dict:
    from zeroc.client import Client
    from zeroc.stack import ServiceProcess, Stack
    from zeroc.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(BUNDLED_MODEL).encode(BUNDLED_HELDOUT.read_text())
    if (2 * spec.rounds + 2) * 2 * spec.tokens > len(ids):
        raise ValueError(f"{spec.rounds} rounds of {spec.tokens}-token prompts need more held-out text")
    rows = {"disaggregated": [], "colocated": []}
    with Stack(1) as stack:
        colocated = ServiceProcess("decode", ["--colocated"], {"ZEROC_REDIS_URL": stack.redis_url})
        try:
            colocated.wait_serving()
            targets = {"disaggregated": stack.decode[0], "colocated": colocated.address}
            with tqdm(total=2 * spec.rounds, desc="prefix TTFT", disable=not progress) as bar:
                for mode, (name, target) in enumerate(targets.items()):
                    with Client(target, timeout=600) as client:
                        _ttft_ms(client, _prompts(ids, spec, spec.rounds, mode)[0])  # warm-up, not counted
                        for r in range(spec.rounds):
                            cold_prompt, warm_prompt = _prompts(ids, spec, r, mode)
                            cold, cold_cached = _ttft_ms(client, cold_prompt)
                            warm, warm_cached = _ttft_ms(client, warm_prompt)
                            rows[name].append({"cold_ms": cold, "warm_ms": warm, "cold_cached": cold_cached,
                                               "warm_cached": warm_cached})
                            bar.update()
        finally:
            colocated.stop()
    out = {}
    for name, rs in rows.items():
        cold = statistics.median(r["cold_ms"] for r in rs)
        warm = statistics.median(r["warm_ms"] for r in rs)
        out[name] = {"cold_ttft_ms": cold, "warm_ttft_ms": warm, "warm_over_cold": warm / cold,
                     "warm_cached_tokens": rs[0]["warm_cached"], "cold_cached_tokens": rs[0]["cold_cached"],
                     "rounds": rs}
    return out


def _latency(client, fn, n: int) -> dict:
    """Client-side latency percentiles, and Redis's own time per operation (INFO commandstats), which a
    loaded machine's scheduling delays do not inflate."""
    client.config_resetstat()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e6)
    server_us = sum(v["usec"] for k, v in client.info("commandstats").items() if k != "cmdstat_info")
    samples.sort()
    return {"p10_us": samples[len(samples) // 10], "p50_us": samples[len(samples) // 2],
            "p99_us": samples[int(len(samples) * 0.99)], "ops_per_s": n / (sum(samples) / 1e6),
            "server_us_per_op": server_us / n}


def bench_index(spec: PrefixBenchSpec, threads: int = 4) -> dict:
    chain = [uuid.uuid4().hex for _ in range(64)]
    with EmbeddedRedis() as server:
        index = RedisBlockIndex(server.url, namespace="bench")
        for holder in ("a:1", "b:1"):
            index.register(holder, 60)
            index.put(holder, [BlockEntry(b, "cpu", 98304, 1) for b in chain])
        entries = [BlockEntry(b, "cpu", 98304, 1) for b in chain]
        n = spec.index_ops
        c = index.client
        out = {
            "lookup_64_blocks": _latency(c, lambda: index.lookup(chain), n),
            "lookup_8_blocks": _latency(c, lambda: index.lookup(chain[:8]), n),
            "lookup_miss": _latency(c, lambda: index.lookup([uuid.uuid4().hex]), n),
            "put_64_entries": _latency(c, lambda: index.put("a:1", entries), n // 4),
            "touch_64": _latency(c, lambda: index.touch("a:1", chain), n // 4),
            "renew_lease": _latency(c, lambda: index.register("a:1", 60), n),
        }
        done = [0]
        lock = threading.Lock()

        def worker() -> None:
            idx = RedisBlockIndex(server.url, namespace="bench")
            for _ in range(n // threads):
                idx.lookup(chain)
            with lock:
                done[0] += n // threads
            idx.close()

        start = time.perf_counter()
        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out[f"lookup_64_blocks_{threads}_threads_ops_per_s"] = done[0] / (time.perf_counter() - start)
        index.close()
    return out


def run_prefix_bench(spec: PrefixBenchSpec, progress: bool = True) -> dict:
    from zeroc.bench.forward import machine_description

    return {"spec": asdict(spec), "machine": machine_description(), "ttft": bench_ttft(spec, progress),
            "index": bench_index(spec)}


def plot_ttft(report: dict, path: str) -> None:
    """Cold vs warm TTFT per mode, as a bar chart PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["ttft"])
    cold = [report["ttft"][m]["cold_ttft_ms"] for m in modes]
    warm = [report["ttft"][m]["warm_ttft_ms"] for m in modes]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(modes))
    ax.bar([i - 0.2 for i in x], cold, 0.4, label="cold")
    ax.bar([i + 0.2 for i in x], warm, 0.4, label="warm (prefix reused)")
    for i, m in enumerate(modes):
        ax.text(i + 0.2, warm[i], f"{report['ttft'][m]['warm_over_cold']:.2f}x", ha="center", va="bottom")
    spec = report["spec"]
    ax.set_xticks(list(x), modes)
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_title(f"{spec['tokens']}-token prompts, {spec['shared']:.0%} shared prefix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
