"""`zeroc bench chaos`: a bounded load on a local stack while faults are injected, one scenario at a time.

The stack: one prefill service, two decode replicas sharing it and one embedded Redis, supervised by
`Stack.wait` (killed services come back on their ports). Each scenario runs `--clients` client threads,
each an SDK `Client` over both decode replicas (round_robin, health-checked, UNAVAILABLE retried before
the first token), sending short greedy requests (`--timeout` deadline each) for `--duration` seconds; the
fault comes a fifth of the way in.

Reported per scenario: requests OK; failed, by status; of those, how many were in flight on the faulted
service; how many were not (the goal is 0); hung (past their deadline, or still running when the load
stopped); how many calls the faulted decode replica was running when the fault came and finished or
failed on it (after SIGTERM, they should all finish: the drain); seconds from the fault to the last
failure; and what leaked once the load stopped: KV cache blocks still taken on a decode replica, and
index entries that name no block a live holder has.

"In flight on the faulted service": the call had been accepted by the faulted decode replica's process
(the SDK's `ClientError.replica`, the id the replica sends once it accepts a call, drawn per process, so
its restarted self has another) and had not ended when the fault came. Clients talk to decode replicas
only, so in the prefill and Redis scenarios no request is in flight on the faulted service: every failure
there counts as not in flight.

Recovery is split in two: from the fault until the faulted service reports SERVING again (exit, supervisor
backoff, process start, model load), and from then until traffic flows through it again (the first
request its new process served; for the prefill service, the first whose KV came from it rather than from
local prefill) — reconnect backoff, retries. A last row fuzzes the public API with mutated requests.
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
from typing import Callable, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from zeroc.client import Client, ClientError
from zeroc.rpc import wait_serving
from zeroc.stack import Stack
from zeroc.v1 import generation_pb2 as pb

REPLICAS = 2
SCENARIOS = (*(f"{kind}-decode-{i}" for kind in ("kill", "term") for i in range(REPLICAS)), "kill-prefill",
             "term-prefill", "redis-down", "stop-past-lease", "prefill-outage")
PROMPTS = [list(range(40 + i, 75 + i)) for i in range(4)]
LEASE_S = 2.0
STOPPED_REPLICA = 0  # the decode replica stop-past-lease stalls


class Record(NamedTuple):
    """One call: when it started and ended (monotonic), its status, whether the prefill service computed
    its KV (kv_bytes_received > 0) and the id of the replica process that had accepted it ("" if none)."""

    start: float
    end: float
    status: str
    remote: bool
    replica: str


@dataclass
class Outcome:
    """One scenario's counts."""

    name: str
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    running: int | None = None  # calls the faulted replica was running at the fault (None: not a decode fault)
    in_flight: int | None = None  # of all failures, those of calls running on the faulted replica
    not_in_flight: int = 0  # every other failure: the goal is 0
    hung: int = 0
    recover_s: float = 0.0
    serving_s: float | None = None  # fault -> the faulted service SERVING again (None: it never went down)
    traffic_s: float | None = None  # SERVING again -> the first request it served (None: none did)
    leaked_blocks: int = 0
    leaked_entries: int = 0


class Load:
    """Client threads, each an SDK client over all `targets`, sending requests until `stop`; each call is
    recorded. A call still running when the load stops and its thread has been waited for is `hung`."""

    def __init__(self, targets: list[str], clients: int, timeout_s: float):
        self.targets, self.timeout_s = targets, timeout_s
        self.records: list[Record] = []
        self.hung = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with Client(self.targets, timeout=self.timeout_s) as c:
            while not self._stop.is_set():
                start, remote = time.monotonic(), False
                try:
                    result = c.generate(PROMPTS[i % len(PROMPTS)], max_tokens=4, ignore_eos=True)
                    status, remote, replica = "OK", result.usage.kv_bytes_received > 0, result.replica
                except ClientError as exc:
                    status, replica = exc.code.name, exc.replica
                    time.sleep(0.05)
                with self._lock:
                    self.records.append(Record(start, time.monotonic(), status, remote, replica))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        self.hung = sum(t.is_alive() for t in self._threads)


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


@dataclass(frozen=True)
class Fault:
    """What a scenario does to the stack, and to which service (an index into `Stack.services`; None: Redis)."""

    inject: Callable[[Stack], None]
    service: int | None

    @property
    def decode(self) -> bool:
        return self.service is not None and self.service > 0


def _signal(sig: int, index: int, pause_s: float = 0.0) -> Fault:
    """Send `sig` to service `index` (0 prefill, 1.. decode replicas); with SIGSTOP, SIGCONT after `pause_s`."""
    def inject(stack: Stack) -> None:
        pid = stack.services[index].proc.pid
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            time.sleep(pause_s)
            os.kill(pid, signal.SIGCONT)
    return Fault(inject, index)


def _redis_down(pause_s: float) -> Fault:
    def inject(stack: Stack) -> None:
        stack.redis.stop()
        time.sleep(pause_s)
        stack.redis.start()  # empty, as after a crash: holders must refill it
    return Fault(inject, None)


def faults(duration_s: float) -> dict[str, Fault]:
    chosen = {f"{kind}-decode-{i}": _signal(sig, 1 + i) for kind, sig in (("kill", signal.SIGKILL),
                                                                           ("term", signal.SIGTERM))
              for i in range(REPLICAS)}
    return {**chosen, "kill-prefill": _signal(signal.SIGKILL, 0), "term-prefill": _signal(signal.SIGTERM, 0),
            "redis-down": _redis_down(duration_s / 3),
            "stop-past-lease": _signal(signal.SIGSTOP, 1 + STOPPED_REPLICA, LEASE_S * 2),
            "prefill-outage": _signal(signal.SIGSTOP, 0, duration_s / 3)}


def _idle(target: str, timeout_s: float) -> pb.GetModelInfoResponse | None:
    """A decode service's info once nothing runs or waits (None if it never answers)."""
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


def leaked_entries(stack: Stack, held: dict[str, int]) -> int:
    """Index entries naming a holder that is gone, or more entries for a live decode replica than it holds
    (`held`: internal address -> blocks it reports holding)."""
    from kv_store.index import RedisBlockIndex

    index = RedisBlockIndex(stack.redis_url, "zeroc")
    try:
        live = {s.internal_address for s in stack.services}
        leaked = 0
        for holder in (h.decode() for h in index.client.smembers(f"{index.prefix}holders")):
            listed = len(index.held_by(holder))
            if holder not in live:
                leaked += listed
            elif holder in held:
                leaked += max(0, listed - held[holder])
        return leaked
    finally:
        index.close()


def replica_id(address: str, timeout_s: float) -> str:
    """The id of the process serving at `address` once it serves (one request sent to it alone); "" if it
    does not serve within `timeout_s`."""
    try:
        wait_serving(address, timeout_s)
        with Client(address, timeout=timeout_s) as c:
            return c.generate(PROMPTS[0], max_tokens=1).replica
    except (TimeoutError, ClientError):
        return ""


def _recovery(out: Outcome, records: list[Record], t0: float, watch: ServingWatch, after: str | None) -> None:
    """Fill `serving_s` and `traffic_s` (see the module docstring). `after`: the id of the faulted decode
    replica's process once the fault is over (a new one after a restart); None for the other services."""
    if watch.serving_at is None:
        return
    out.serving_s = watch.serving_at - t0
    # A request the faulted service served once back ended after it served; the earliest such end.
    served = [r.end for r in records if r.status == "OK" and r.end > watch.serving_at
              and (r.replica == after if after is not None else r.remote)]
    if served:
        out.traffic_s = max(0.0, min(served) - watch.serving_at)


def _count(out: Outcome, records: list[Record], t0: float, faulted: str | None) -> None:
    """OK / failed / hung, and which failures were in flight on the faulted replica (id `faulted`)."""
    if faulted is not None:
        out.in_flight = 0
        out.running = sum(r.replica == faulted and r.start < t0 < r.end for r in records)
    for r in records:
        if r.status == "OK":
            out.ok += 1
            continue
        if r.status == "DEADLINE_EXCEEDED":
            out.hung += 1
        else:
            out.failed[r.status] += 1
            if faulted is not None and r.replica == faulted and r.start < t0 < r.end:
                out.in_flight += 1
            else:
                out.not_in_flight += 1
        if r.end > t0:
            out.recover_s = max(out.recover_s, r.end - t0)


def _leaks(out: Outcome, stack: Stack) -> None:
    time.sleep(LEASE_S * 1.5)  # a dead holder's entries go with its lease
    held: dict[str, int] = {}
    for svc in stack.services[1:]:
        info = _idle(svc.address, 30)
        if info is None:
            out.leaked_blocks = -1  # never answered: reported, and counted as a failure of the run
            continue
        out.leaked_blocks += info.kv_blocks_total - info.kv_blocks_free
        held[svc.internal_address] = info.kv_store.blocks_held
    out.leaked_entries = leaked_entries(stack, held)


def run_scenario(stack: Stack, name: str, fault: Fault, duration_s: float, clients: int,
                 timeout_s: float) -> Outcome:
    decodes = stack.decode
    for svc in stack.services:  # the last scenario's restarts are over: this fault is the only one measured
        wait_serving(svc.address, 120)
    faulted = replica_id(stack.services[fault.service].address, timeout_s) if fault.decode else None
    watched = stack.services[fault.service].address if fault.service is not None else stack.prefill
    with Load(decodes, clients, timeout_s) as load:
        time.sleep(duration_s / 5)
        with ServingWatch(watched) as watch:
            t0 = time.monotonic()
            fault.inject(stack)
            time.sleep(max(0.0, duration_s - (time.monotonic() - t0) - duration_s / 5))
    out = Outcome(name)
    _count(out, load.records, t0, faulted)
    out.hung += load.hung
    after = replica_id(watched, 60) if fault.decode else None
    _recovery(out, load.records, t0, watch, after)
    _leaks(out, stack)
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
    lines = ["| scenario | OK | failed (by status) | failed, in flight on the faulted service | failed, not in flight | "
             "hung | calls it was running at the fault | failures end after fault (s) | serving again after fault (s) "
             "| traffic after serving (s) | leaked blocks | leaked index entries |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for o in outcomes:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(o.failed.items())) or "0"
        lines.append(f"| {o.name} | {o.ok} | {failed} | {'-' if o.in_flight is None else o.in_flight} | "
                     f"{o.not_in_flight} | {o.hung} | {'-' if o.running is None else o.running} | "
                     f"{o.recover_s:.1f} | {secs(o.serving_s)} | "
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
    """Non-zero when any scenario had a failure not in flight on the faulted service, a hung request, a
    leak, or the fuzz got UNKNOWN / INTERNAL."""
    env = {"ZEROC_STORE_LEASE_S": str(LEASE_S), "ZEROC_REDIS_RETRY_S": "0.2", "ZEROC_TRANSFER_TIMEOUT_S": "5"}
    outcomes: list[Outcome] = []
    with Stack(REPLICAS, env=env) as stack:
        supervisor = threading.Thread(target=stack.wait, daemon=True)
        supervisor.start()
        chosen = faults(args.duration)
        for name in tqdm(args.scenarios, desc="chaos", file=sys.stderr):
            outcomes.append(run_scenario(stack, name, chosen[name], args.duration, args.clients, args.timeout))
        counts, after = None, ""
        if args.fuzz:
            before = replica_id(stack.decode[0], args.timeout)
            counts = fuzz(stack.decode[0], args.fuzz)
            # the same process must still answer a normal request: a crash and restart would change its id
            after = "yes" if before and replica_id(stack.decode[0], args.timeout) == before else "NO"
        stack.stop()
        supervisor.join(10)
    print(f"zeroc bench chaos ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{dt.date.today()}): {REPLICAS} decode replicas, {args.duration:g} s per scenario, {args.clients} clients")
    print(table(outcomes, counts))
    if args.fuzz:
        print(f"The fuzzed replica answered a normal request afterwards, in the same process: {after}")
    bad = (after == "NO") + sum(o.not_in_flight + o.hung + abs(o.leaked_blocks) + o.leaked_entries for o in outcomes)
    bad += sum(v for k, v in (counts or {}).items() if k in ("UNKNOWN", "INTERNAL"))
    return 1 if bad else 0
