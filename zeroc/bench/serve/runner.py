"""Start a method's services (real processes) and drive load at them with the asyncio SDK."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from zeroc.bench.serve.metrics import RequestRecord
from zeroc.bench.serve.methods import Method
from zeroc.bench.serve.topology import Topology
from zeroc.bench.serve.workloads import BenchRequest
from zeroc.client import AsyncClient, Chunk, ClientError, Result


@dataclass(frozen=True)
class StackPlan:
    """One method's services in one mode: what to start and with which flags."""

    method: Method
    mode: str  # colocated | disaggregated
    model_dir: Path
    decode_args: tuple[str, ...]  # capacity flags and anything else only the decode service gets


class ServiceStack:
    """A decode service (and, disaggregated, its prefill service) placed by a `Topology`.

    Children stop when `close()` runs (or when this process dies: ZEROC_EXIT_WITH_PARENT)."""

    def __init__(self, plan: StackPlan, topology: Topology, env: dict[str, str] | None = None,
                 start_timeout_s: float = 300.0):
        self.plan, self.topology, self.env, self.timeout = plan, topology, env, start_timeout_s
        self.services: list = []
        self.address = ""

    def start(self) -> "ServiceStack":
        from zeroc.stack import ServiceProcess

        plan, topo = self.plan, self.topology
        # No KV store: these stacks measure the cache and the link per method, and prompts that share
        # blocks would turn into prefix hits (measure reuse with `--target` on a running stack).
        common = ["--model", str(plan.model_dir), "--redis-url", "off", *plan.method.serve_args]
        # The benchmark's network namespaces are private to this machine: plaintext off loopback is fine there.
        env = {**(self.env or {}), "ZEROC_SECURITY_ALLOW_PLAINTEXT": "any"}
        try:
            if plan.mode == "disaggregated":
                prefill = ServiceProcess("prefill", common, env, self.timeout, topo.bind_host("prefill"),
                                         topo.prefix("prefill"))
                self.services.append(prefill)
                prefill.wait_serving(self.timeout, topo.admin_address("prefill", prefill.port))
                where = ["--prefill", topo.prefill_for_decode(prefill.port)]
            else:
                where = ["--colocated"]
            decode = ServiceProcess("decode", [*common, *plan.decode_args, *where], env, self.timeout,
                                    topo.bind_host("decode"), topo.prefix("decode"))
            self.services.append(decode)
            decode.wait_serving(self.timeout, topo.admin_address("decode", decode.port))
            self.address = topo.client_address(decode.port)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        self.services.clear()

    def __enter__(self) -> "ServiceStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


async def send_request(client: AsyncClient, req: BenchRequest, rec: RequestRecord, t0: float) -> RequestRecord:
    """Send `req` over gRPC at its scheduled offset from t0 and record its timings and usage in `rec`."""
    await asyncio.sleep(max(0.0, t0 + rec.scheduled_s - time.perf_counter()))
    rec.sent_s = time.perf_counter() - t0
    try:
        async for item in client.stream(req.prompt_ids, max_tokens=req.max_tokens, ignore_eos=True):
            now = time.perf_counter() - t0
            if isinstance(item, Chunk) and item.token_ids:
                rec.chunk_s.append(now)
                rec.chunk_tokens.append(len(item.token_ids))
            elif isinstance(item, Result):
                rec.done_s = now
                u = item.usage
                rec.cached_prefix_tokens, rec.kv_bytes_received = u.cached_prefix_tokens, u.kv_bytes_received
                rec.queue_ms, rec.preemptions = u.queue_ms, u.preemptions
    except ClientError as exc:
        rec.error = f"{exc.code.name}: {exc.details}"[:300]
    return rec


async def _drive(address: str, requests: list[BenchRequest], offsets: list[float], timeout_s: float,
                 progress) -> list[RequestRecord]:
    records = [RequestRecord(i, len(r.prompt_ids), r.max_tokens, float(t))
               for i, (r, t) in enumerate(zip(requests, offsets))]
    async with AsyncClient(address, timeout=timeout_s) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(send_request(client, r, rec, t0)) for r, rec in zip(requests, records)]
        for fut in asyncio.as_completed(tasks):
            await fut
            if progress is not None:
                progress.update(1)
    return records


def run_load(address: str, requests: list[BenchRequest], offsets, timeout_s: float = 900.0,
             progress=None) -> list[RequestRecord]:
    """Send `requests[i]` at `offsets[i]` seconds from now to a decode service; their timelines.

    `progress` (a tqdm bar, optional) advances once per finished request."""
    if len(requests) != len(offsets):
        raise ValueError(f"{len(requests)} requests but {len(offsets)} arrival times")
    return asyncio.run(_drive(address, requests, list(offsets), timeout_s, progress))


def warm_up(address: str, request: BenchRequest) -> None:
    """One request through the stack before measuring (first forwards allocate and warm caches)."""
    rec = run_load(address, [BenchRequest(request.prompt_ids, min(2, request.max_tokens))], [0.0])[0]
    if not rec.ok:
        raise RuntimeError(f"warm-up request to {address} failed: {rec.error}")
