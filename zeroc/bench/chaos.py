"""`zeroc bench chaos`: a bounded load on a local stack while faults are injected, one scenario at a time.

Each scenario runs `--clients` client threads sending short greedy requests (`--timeout` deadline each)
for `--duration` seconds; the fault comes a fifth of the way in. Reported per scenario: requests OK,
failed by status, hung (past their deadline), seconds from the fault to the last failure, and what
leaked once the load stopped: KV cache blocks still taken on the decode service, and index entries
that name no block a live holder has. Recovery is split in two: from the fault until the faulted
service reports SERVING again (exit, supervisor backoff, process start, model load), and from then
until traffic flows through it again (the first request it served: for the prefill service, the first
whose KV came from it rather than from local prefill) — reconnect backoff, retries. A last row fuzzes the public API with mutated requests. The
stack supervises its services (`Stack.wait`), so killed ones come back on their ports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from zeroc.client import Client, ClientError
from zeroc.stack import Stack
from zeroc.v1 import generation_pb2 as pb

SCENARIOS = ("kill-decode", "term-decode", "kill-prefill", "term-prefill", "redis-down", "stop-past-lease",
             "prefill-outage")
PROMPTS = [list(range(40 + i, 75 + i)) for i in range(4)]
LEASE_S = 2.0


@dataclass
class Outcome:
    """One scenario's counts."""

    name: str
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    hung: int = 0
    recover_s: float = 0.0
    serving_s: float | None = None  # fault -> the faulted service SERVING again (None: it never went down)
    traffic_s: float | None = None  # SERVING again -> the first request it served (None: none did)
    leaked_blocks: int = 0
    leaked_entries: int = 0


class Load:
    """Client threads sending requests until `stop`; each call's (start, end, status) is recorded."""

    def __init__(self, target: str, clients: int, timeout_s: float):
        self.target, self.timeout_s = target, timeout_s
        # (start, end, status, whether the prefill service computed the KV: kv_bytes_received > 0)
        self.records: list[tuple[float, float, str, bool]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with Client(self.target, timeout=self.timeout_s) as c:
            while not self._stop.is_set():
                start, remote = time.monotonic(), False
                try:
                    result = c.generate(PROMPTS[i % len(PROMPTS)], max_tokens=4, ignore_eos=True)
                    status, remote = "OK", result.usage.kv_bytes_received > 0
                except ClientError as exc:
                    status = exc.code.name
                    time.sleep(0.05)
                with self._lock:
                    self.records.append((start, time.monotonic(), status, remote))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)


class ServingWatch:
    """Asks a service's health every 50 ms, each time on a fresh channel (so no reconnect backoff delays
    what it sees): when it was first seen not serving, and when it served again after that."""

    def __init__(self, target: str):
        self.target = target
        self.down_at: float | None = None
        self.serving_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            serving = self._serving()
            if not serving and self.down_at is None:
                self.down_at = time.monotonic()
            elif serving and self.down_at is not None:
                self.serving_at = time.monotonic()
                return

    def __enter__(self) -> "ServingWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def _signal(sig: int, index: int, pause_s: float = 0.0) -> Callable[[Stack], None]:
    """Send `sig` to service `index` (0 prefill, 1 decode); with SIGSTOP, SIGCONT after `pause_s`."""
    def fault(stack: Stack) -> None:
        pid = stack.services[index].proc.pid
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            time.sleep(pause_s)
            os.kill(pid, signal.SIGCONT)
    return fault


def _redis_down(pause_s: float) -> Callable[[Stack], None]:
    def fault(stack: Stack) -> None:
        stack.redis.stop()
        time.sleep(pause_s)
        stack.redis.start()  # empty, as after a crash: holders must refill it
    return fault


def faults(duration_s: float) -> dict[str, Callable[[Stack], None]]:
    return {"kill-decode": _signal(signal.SIGKILL, 1), "term-decode": _signal(signal.SIGTERM, 1),
            "kill-prefill": _signal(signal.SIGKILL, 0), "term-prefill": _signal(signal.SIGTERM, 0),
            "redis-down": _redis_down(duration_s / 3),
            "stop-past-lease": _signal(signal.SIGSTOP, 1, LEASE_S * 2),
            "prefill-outage": _signal(signal.SIGSTOP, 0, duration_s / 3)}


def _idle(target: str, timeout_s: float) -> pb.GetModelInfoResponse | None:
    """The decode service's info once nothing runs or waits (None if it never answers)."""
    deadline = time.monotonic() + timeout_s
    info = None
    while time.monotonic() < deadline:
        try:
            with Client(target, timeout=5) as c:
                info = c.model_info()
            if info.requests_running == 0 and info.requests_queued == 0:
                return info
        except ClientError:
            pass
        time.sleep(0.2)
    return info


def leaked_entries(stack: Stack) -> int:
    """Index entries naming a holder that is gone, or more entries for a live holder than it holds."""
    from kv_store.index import RedisBlockIndex

    index = RedisBlockIndex(stack.redis_url, "zeroc")
    try:
        live = {s.internal_address: s for s in stack.services}
        leaked = 0
        for holder in (h.decode() for h in index.client.smembers(f"{index.prefix}holders")):
            listed = len(index.held_by(holder))
            svc = live.get(holder)
            if svc is None:
                leaked += listed
                continue
            if svc is stack.services[1]:
                info = _idle(stack.decode[0], 10)
                held = info.kv_store.blocks_held if info is not None else 0
                leaked += max(0, listed - held)
        return leaked
    finally:
        index.close()


def _recovery(out: Outcome, records: list[tuple[float, float, str, bool]], t0: float, watch: ServingWatch,
              prefill: bool) -> None:
    """Fill `serving_s` and `traffic_s` (see the module docstring)."""
    if watch.serving_at is None:
        return
    out.serving_s = watch.serving_at - t0
    # A request served by the restarted service ended after it served; the earliest such end.
    served = [end for start, end, status, remote in records
              if status == "OK" and end > watch.serving_at and (remote or not prefill)]
    if served:
        out.traffic_s = max(0.0, min(served) - watch.serving_at)


def run_scenario(stack: Stack, name: str, fault: Callable[[Stack], None], duration_s: float, clients: int,
                 timeout_s: float) -> Outcome:
    target = stack.decode[0]
    prefill = "prefill" in name
    with Load(target, clients, timeout_s) as load:
        time.sleep(duration_s / 5)
        with ServingWatch(stack.prefill if prefill else target) as watch:
            t0 = time.monotonic()
            fault(stack)
            time.sleep(max(0.0, duration_s - (time.monotonic() - t0) - duration_s / 5))
    out = Outcome(name)
    _recovery(out, load.records, t0, watch, prefill)
    for start, end, status, _ in load.records:
        if status == "OK":
            out.ok += 1
        elif status == "DEADLINE_EXCEEDED":
            out.hung += 1
        else:
            out.failed[status] += 1
        if status != "OK" and end > t0:
            out.recover_s = max(out.recover_s, end - t0)
    time.sleep(LEASE_S * 1.5)  # a dead holder's entries go with its lease
    info = _idle(target, 30)
    out.leaked_blocks = (info.kv_blocks_total - info.kv_blocks_free) if info is not None else -1
    out.leaked_entries = leaked_entries(stack)
    return out


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(data))
        if rng.random() < 0.5 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(data)


def fuzz(target: str, n: int, seed: int = 0) -> Counter:
    """`n` mutated Generate / Tokenize / GetModelInfo requests; their statuses."""
    rng = random.Random(seed)
    base = [("/zeroc.v1.GenerationService/Generate", pb.GenerateRequest(
                prompt_token_ids=[5, 6, 7], sampling=pb.SamplingParams(max_tokens=2)).SerializeToString()),
            ("/zeroc.v1.GenerationService/Tokenize", pb.TokenizeRequest(text="hello").SerializeToString()),
            ("/zeroc.v1.GenerationService/GetModelInfo", b"")]
    cases = [(base[i % 3][0], _mutate(rng, base[i % 3][1])) for i in range(n)]
    with grpc.insecure_channel(target) as channel:
        def one(case: tuple[str, bytes]) -> str:
            method, raw = case
            stream = method.endswith("Generate")
            try:
                result = (channel.unary_stream if stream else channel.unary_unary)(method)(raw, timeout=10)
                if stream:
                    list(result)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name
        with ThreadPoolExecutor(8) as pool:
            return Counter(pool.map(one, cases))


def table(outcomes: list[Outcome], fuzz_counts: Counter | None) -> str:
    lines = ["| scenario | OK | failed (by status) | hung | failures end after fault (s) | serving again after "
             "fault (s) | traffic after serving (s) | leaked blocks | leaked index entries |",
             "|---|---|---|---|---|---|---|---|---|"]

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for o in outcomes:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(o.failed.items())) or "0"
        lines.append(f"| {o.name} | {o.ok} | {failed} | {o.hung} | {o.recover_s:.1f} | {secs(o.serving_s)} | "
                     f"{secs(o.traffic_s)} | {o.leaked_blocks} | {o.leaked_entries} |")
    if fuzz_counts is not None:
        lines.append("")
        lines.append("Fuzz (mutated public requests): " + ", ".join(f"{k} {v}" for k, v in sorted(fuzz_counts.items())))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="faults to inject")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per scenario")
    p.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    p.add_argument("--timeout", type=float, default=20.0, help="each request's deadline (past it: hung)")
    p.add_argument("--fuzz", type=int, default=2000, help="mutated requests sent at the end (0: none)")


def run(args: argparse.Namespace) -> int:
    env = {"ZEROC_STORE_LEASE_S": str(LEASE_S), "ZEROC_REDIS_RETRY_S": "0.2", "ZEROC_TRANSFER_TIMEOUT_S": "5"}
    outcomes: list[Outcome] = []
    with Stack(1, env=env) as stack:
        supervisor = threading.Thread(target=stack.wait, daemon=True)
        supervisor.start()
        chosen = faults(args.duration)
        for name in tqdm(args.scenarios, desc="chaos", file=sys.stderr):
            outcomes.append(run_scenario(stack, name, chosen[name], args.duration, args.clients, args.timeout))
        counts = fuzz(stack.decode[0], args.fuzz) if args.fuzz else None
        stack.stop()
        supervisor.join(10)
    print(f"zeroc bench chaos ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{dt.date.today()}): {args.duration:g} s per scenario, {args.clients} clients")
    print(table(outcomes, counts))
    bad = sum(o.hung + o.leaked_blocks + o.leaked_entries for o in outcomes)
    bad += sum(v for k, v in (counts or {}).items() if k in ("UNKNOWN", "INTERNAL"))
    return 1 if bad else 0
