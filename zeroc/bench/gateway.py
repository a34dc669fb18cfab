"""`zeroc bench gateway`: the same load through the HTTP gateway and straight over gRPC, side by side.

Each round sends `--requests` requests with `--concurrency` streams in flight (closed loop) once
over gRPC (the asyncio SDK) and once through the gateway (OpenAI streaming completions), in
alternating order; the metrics are `zeroc bench serve`'s (TTFT, TPOT, ITL, throughput). Prompts
are fixed-length slices of held-out text, with fresh prompts for every backend and round so no
prefix cache favours either; outputs have exactly `--output-tokens` tokens (ignore_eos).

The HTTP side is a minimal asyncio HTTP/1.1 client (chunked SSE parsed by hand, each event's JSON
decoded) so the client's own cost stays comparable to the gRPC SDK's; it keeps its connections
alive between requests, as the `openai` SDK (httpx) does and as the gRPC side keeps its channel.
It asks for `return_token_ids` to count tokens per event exactly as the gRPC side does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from zeroc.bench.serve.metrics import RequestRecord, summarize
from zeroc.bench.serve.runner import send_request
from zeroc.bench.serve.workloads import BenchRequest, LengthDist, WorkloadSpec, build_requests, text_tokens
from zeroc.client import AsyncClient
from zeroc.config import BUNDLED_HELDOUT, BUNDLED_MODEL, ZeroCError

BACKENDS = ("grpc", "openai")


async def _read_chunked(reader: asyncio.StreamReader):
    """The chunks of an HTTP/1.1 chunked body, as they arrive."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()  # the empty trailer: the connection is ready for the next request
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


class HttpConnections:
    """Idle keep-alive HTTP/1.1 connections to one server, reused by the next request."""

    def __init__(self, address: str):
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._idle:
            return self._idle.pop()
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def give_back(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self._idle.append(conn)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _openai_send(pool: HttpConnections, req: BenchRequest, rec: RequestRecord, t0: float, model: str) -> None:
    body = json.dumps({"model": model, "prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "return_token_ids": True,
                       "stream_options": {"include_usage": True}}).encode()
    rec.sent_s = time.perf_counter() - t0
    reader, writer = conn = await pool.take()
    reusable = False
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (pool.host.encode(), len(body)) + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if not head.startswith("HTTP/1.1 200"):
            rec.error = head.split("\r\n", 1)[0][:200]
            return
        buf = b""
        async for data in _read_chunked(reader):
            buf += data
            *events, buf = buf.split(b"\n\n")
            now = time.perf_counter() - t0
            for event in events:
                _record_event(rec, event.removeprefix(b"data: "), now)
        reusable = True
    finally:
        if reusable:
            pool.give_back(conn)
        else:
            writer.close()


def _record_event(rec: RequestRecord, payload: bytes, now: float) -> None:
    if payload == b"[DONE]":
        rec.done_s = now
        return
    msg = json.loads(payload)
    if "error" in msg:
        rec.error = msg["error"]["message"][:200]
    elif msg["choices"] and msg["choices"][0].get("token_ids"):
        rec.chunk_s.append(now)
        rec.chunk_tokens.append(len(msg["choices"][0]["token_ids"]))
    elif msg.get("usage"):
        rec.cached_prefix_tokens = msg["usage"]["prompt_tokens_details"]["cached_tokens"]


async def _closed_loop(backend: str, target: str, gateway: str, model: str, requests: list[BenchRequest],
                       concurrency: int) -> list[RequestRecord]:
    records = [RequestRecord(i, len(r.prompt_ids), r.max_tokens, 0.0) for i, r in enumerate(requests)]
    slots = asyncio.Semaphore(concurrency)
    pool = HttpConnections(gateway)
    async with AsyncClient(target, timeout=600) as client:
        t0 = time.perf_counter()

        async def one(req: BenchRequest, rec: RequestRecord) -> None:
            async with slots:
                if backend == "grpc":
                    await send_request(client, req, rec, t0)
                else:
                    await _openai_send(pool, req, rec, t0, model)

        try:
            await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records)))
        finally:
            pool.close()
    return records


async def _pairs(target: str, gateway: str, model: str, requests: list[BenchRequest]) -> list[dict]:
    """One request at a time, gRPC and gateway in turn (alternating which goes first): each pair's TTFTs."""
    out = []
    pool = HttpConnections(gateway)
    async with AsyncClient(target, timeout=600) as client:
        for i in range(0, len(requests) - 1, 2):
            recs = {}
            for j, backend in enumerate(BACKENDS if i % 4 == 0 else BACKENDS[::-1]):
                req = requests[i + j]
                rec = RequestRecord(i + j, len(req.prompt_ids), req.max_tokens, 0.0)
                t0 = time.perf_counter()
                if backend == "grpc":
                    await send_request(client, req, rec, t0)
                else:
                    await _openai_send(pool, req, rec, t0, model)
                if not rec.ok:
                    raise ZeroCError(f"{backend}: a request failed: {rec.error}")
                recs[backend] = rec.ttft_s * 1000
            out.append(recs)
    pool.close()
    return out


def _requests(args: argparse.Namespace, tokens, bos: int | None, seed: int) -> list[BenchRequest]:
    spec = WorkloadSpec("chat", LengthDist(args.prompt_tokens, 0.0, args.prompt_tokens, args.prompt_tokens),
                        LengthDist(args.output_tokens, 0.0, args.output_tokens, args.output_tokens))
    return build_requests(spec, tokens, args.requests, 1 << 30, bos, seed)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, target: str, gateway: str, model: str, pids: dict[str, int] | None = None
            ) -> dict:
    """Rounds of both backends, interleaved; per-round summaries and the pooled comparison. `pids` (name ->
    process id of a service this run started) adds each one's CPU time per output token to every round, as
    does this process ("client": the load generator, which shares the machine with the services)."""
    pids = {**(pids or {}), "client": os.getpid()}
    from zeroc.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.model)
    tokens = text_tokens(tokenizer, args.data)
    warm = _requests(args, tokens, tokenizer.bos_id, 10_000)[:2]
    for backend in BACKENDS:
        asyncio.run(_closed_loop(backend, target, gateway, model, warm, 2))
    pairs = []
    if args.pairs:
        single = argparse.Namespace(**{**vars(args), "requests": 2 * args.pairs, "output_tokens": 2})
        pairs = asyncio.run(_pairs(target, gateway, model, _requests(single, tokens, tokenizer.bos_id, 20_000)))
        delta = statistics.median(p["openai"] - p["grpc"] for p in pairs)
        print(f"{len(pairs)} single requests each way: gateway - gRPC TTFT median {delta:+.2f} ms", file=sys.stderr)
    rounds = []
    for r in range(args.rounds):
        order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]  # neither side always runs first
        row = {}
        for backend in order:
            reqs = _requests(args, tokens, tokenizer.bos_id, 2 * r + BACKENDS.index(backend))
            cpu0 = {name: _cpu_s(pid) for name, pid in pids.items()}
            records = asyncio.run(_closed_loop(backend, target, gateway, model, reqs, args.concurrency))
            row[backend] = s = summarize(records).to_dict()
            s["cpu_us_per_token"] = {name: (_cpu_s(pid) - cpu0[name]) / max(1, s["output_tokens"]) * 1e6
                                     for name, pid in pids.items()}
            print(f"round {r + 1} {backend:>6}: {s['completed']}/{len(records)} ok, TTFT p50 {s['ttft']['median']:.1f} "
                  f"ms, TPOT mean {s['tpot']['mean']:.1f} ms, {s['output_throughput']:.1f} tok/s", file=sys.stderr)
            if s["failed"]:
                raise ZeroCError(f"{backend}: {s['failed']} requests failed: {s['errors'][:3]}")
        rounds.append(row)
    return {**_compare(rounds), **_compare_pairs(pairs)}


def _compare_pairs(pairs: list[dict]) -> dict:
    if not pairs:
        return {}
    return {"pairs": pairs, "unloaded_ttft_ms": {b: statistics.median(p[b] for p in pairs) for b in BACKENDS},
            "unloaded_ttft_delta_ms": statistics.median(p["openai"] - p["grpc"] for p in pairs)}


def _compare(rounds: list[dict]) -> dict:
    def med(backend: str, *path: str) -> float:
        vals = []
        for row in rounds:
            v = row[backend]
            for p in path:
                v = v[p]
            vals.append(v)
        return statistics.median(vals)

    out = {"rounds": rounds, "backends": {}}
    for b in BACKENDS:
        out["backends"][b] = {"ttft_p50_ms": med(b, "ttft", "median"), "ttft_p99_ms": med(b, "ttft", "p99"),
                              "tpot_mean_ms": med(b, "tpot", "mean"), "itl_p50_ms": med(b, "itl", "median"),
                              "output_tokens_per_s": med(b, "output_throughput"),
                              "cpu_us_per_token": {name: med(b, "cpu_us_per_token", name)
                                                   for name in rounds[0][b]["cpu_us_per_token"]}}
    # Per round, then their medians: the spread shows how much of a difference is the machine's noise.
    out["ttft_p50_deltas_ms"] = [r["openai"]["ttft"]["median"] - r["grpc"]["ttft"]["median"] for r in rounds]
    out["throughput_ratios"] = [r["openai"]["output_throughput"] / r["grpc"]["output_throughput"] for r in rounds]
    out["ttft_p50_delta_ms"] = statistics.median(out["ttft_p50_deltas_ms"])
    out["throughput_ratio"] = statistics.median(out["throughput_ratios"])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="HOST:PORT of a running decode service (default: start a "
                                                  "colocated one without a KV store)")
    p.add_argument("--gateway", default=None, help="HOST:PORT of a running gateway in front of --target "
                                                   "(default: start one)")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="model directory")
    p.add_argument("--data", default=str(BUNDLED_HELDOUT), help="text the prompts are cut from")
    p.add_argument("--concurrency", type=int, default=16, help="streams in flight")
    p.add_argument("--requests", type=int, default=48, help="requests per backend per round")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds of both backends, alternating which goes first")
    p.add_argument("--pairs", type=int, default=30, help="also: single requests (2 output tokens) through each "
                                                        "backend in turn, unloaded, for the gateway's own latency")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zeroc.stack import ServiceProcess, wait_http

    if min(args.concurrency, args.requests, args.prompt_tokens, args.output_tokens, args.rounds) < 1 or args.pairs < 0:
        raise ZeroCError("--concurrency, --requests, --prompt-tokens, --output-tokens and --rounds must be >= 1, "
                         "--pairs >= 0")
    if args.gateway and not args.target:
        raise ZeroCError("--gateway needs the --target it forwards to")
    started: list[ServiceProcess] = []
    try:
        target, gateway = args.target, args.gateway
        if target is None:
            started.append(ServiceProcess("decode", ["--colocated", "--redis-url", "off", "--model", args.model]))
            started[-1].wait_serving()
            target = started[-1].address
        if gateway is None:
            started.append(ServiceProcess("gateway", ["--target", target, "--model", args.model]))
            wait_http(started[-1].address, 60)
            gateway = started[-1].address
        report = measure(args, target, gateway, Path(args.model).resolve().name,
                         {svc.kind: svc.proc.pid for svc in started})
    finally:
        for svc in reversed(started):
            svc.stop()
    report["settings"] = {k: v for k, v in vars(args).items() if k in (
        "concurrency", "requests", "prompt_tokens", "output_tokens", "rounds", "pairs")}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.concurrency} concurrent streams, {args.requests} requests of {args.prompt_tokens} + "
          f"{args.output_tokens} tokens per backend and round, medians of {args.rounds} rounds:")
    cpus = list(report["backends"]["grpc"]["cpu_us_per_token"])
    print(f"  {'':8}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT':>8}{'ITL p50':>9}{'tok/s':>8}"
          + "".join(f"{name + ' CPU us/tok':>20}" for name in cpus))
    for name, b in report["backends"].items():
        print(f"  {name:8}{b['ttft_p50_ms']:>10.1f}{b['ttft_p99_ms']:>10.1f}{b['tpot_mean_ms']:>8.1f}"
              f"{b['itl_p50_ms']:>9.1f}{b['output_tokens_per_s']:>8.1f}"
              + "".join(f"{b['cpu_us_per_token'][c]:>20.0f}" for c in cpus))
    print(f"gateway - gRPC p50 TTFT: {report['ttft_p50_delta_ms']:+.2f} ms; gateway / gRPC throughput: "
          f"{report['throughput_ratio']:.3f}")
    print("  per round: TTFT " + ", ".join(f"{d:+.0f}" for d in report["ttft_p50_deltas_ms"]) + " ms; throughput "
          + ", ".join(f"{r:.2f}" for r in report["throughput_ratios"]))
    if "unloaded_ttft_delta_ms" in report:
        t = report["unloaded_ttft_ms"]
        print(f"unloaded, one request at a time ({len(report['pairs'])} pairs): TTFT gRPC {t['grpc']:.1f} ms, "
              f"gateway {t['openai']:.1f} ms, paired median difference {report['unloaded_ttft_delta_ms']:+.2f} ms")
    return 0

