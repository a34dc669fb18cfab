"""Closed-loop load against a running decode service (or an OpenAI-compatible server): `concurrency` clients,
each sending its next request as soon as the last one finished. Run by hand, not in CI.

    .venv/bin/python benchmarks/closed_loop.py --target 127.0.0.1:PORT --concurrency 4 16

Every request is a fixed-length prompt of random token ids with a fixed number of new tokens (ignore_eos), as
vLLM's `benchmark_serving` random dataset does. Figures: output tok/s over the run, TTFT and TPOT mean/p50/p99.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

# One request's stream: yields the number of new tokens in each chunk as they arrive.
Streamer = Callable[[list[int], int], Iterator[int]]


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    requests: int
    output_tok_s: float
    ttft_ms_mean: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    tpot_ms_mean: float
    tpot_ms_p50: float
    tpot_ms_p99: float


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids avoiding the low special ids (bos/eos/pad sit at 0..3 in the bundled tokenizer)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(n)]


def run_closed_loop(stream: Streamer, concurrency: int, requests: list[list[int]], new_tokens: int) -> LoadResult:
    """Send `requests` with `concurrency` clients in a closed loop; returns the run's figures."""
    todo = list(reversed(requests))
    lock = threading.Lock()
    ttfts: list[float] = []
    tpots: list[float] = []
    produced = [0]

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                ids = todo.pop()
            start = time.perf_counter()
            first = last = None
            count = 0
            for n in stream(ids, new_tokens):
                now = time.perf_counter()
                if first is None and n:
                    first = now
                count += n
                last = now
            with lock:
                produced[0] += count
                if first is not None:
                    ttfts.append((first - start) * 1000)
                    if count > 1:
                        tpots.append((last - first) * 1000 / (count - 1))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return LoadResult(concurrency, len(requests), produced[0] / wall,
                      statistics.fmean(ttfts), percentile(ttfts, 50), percentile(ttfts, 99),
                      statistics.fmean(tpots), percentile(tpots, 50), percentile(tpots, 99))


def zeroc_streamer(target: str, temperature: float = 0.0, top_p: float = 1.0) -> Streamer:
    """Stream from a ZeroC decode service over gRPC (one channel shared by the clients, as a gateway would)."""
    from zeroc.client import Chunk, Client  # the project's client; the vLLM venv does not import it

    client = Client(target, timeout=600)

    def stream(ids: list[int], new_tokens: int) -> Iterator[int]:
        for item in client.stream(ids, max_tokens=new_tokens, ignore_eos=True, temperature=temperature, top_p=top_p):
            if isinstance(item, Chunk):
                yield len(item.token_ids)

    return stream


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HOST:PORT of a ZeroC decode service")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    stream = zeroc_streamer(args.target)
    list(stream(prompts(1, args.prompt_tokens, args.vocab, seed=99)[0], 4))  # warm-up
    for c in args.concurrency:
        reqs = prompts(c * args.requests_per_client, args.prompt_tokens, args.vocab, seed=c)
        print(json.dumps(asdict(run_closed_loop(stream, c, reqs, args.new_tokens))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
