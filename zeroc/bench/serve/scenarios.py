"""The benchmark plan: scenarios x modes x link rates x request rates x methods, measured side by side.

For each scenario and mode every method's stack is started once and kept up; then, for each link
rate and request rate, the same requests at the same arrival times go to each method in turn, so
slow drifts of a shared machine hit all methods alike.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from zeroc.bench.serve.load import LoadSpec, arrivals
from zeroc.bench.serve.methods import (MODES, Method, capacity_args, kv_bytes_per_token, prepare_model,
                                       uses_kv_policy)
from zeroc.bench.serve.metrics import SLO, RequestRecord, summarize
from zeroc.bench.serve.runner import ServiceStack, StackPlan, run_load, warm_up
from zeroc.bench.serve.topology import Loopback, ShapedProxy, Topology
from zeroc.bench.serve.workloads import build_requests, preset, text_tokens
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL, REPO_ROOT, ModelConfig, ZeroCError


@dataclass(frozen=True)
class Scenario:
    """One side-by-side comparison.

    memory: the decode cache holds `cache_requests` full-context requests of the uncompressed
    model (in bytes, equal for every method); network: the prefill -> decode link is shaped to
    each of `links_mbit` (so only disaggregated runs) with a roomy cache.

    `rates` None means automatic, per mode: `rate_multipliers` x 1 / J, J the mean JCT of requests
    sent one at a time to the uncompressed stack, so the sweep brackets saturation on whatever
    machine runs it."""

    name: str
    workload: str
    modes: tuple[str, ...]
    rates: tuple[float, ...] | None
    links_mbit: tuple[float | None, ...] = (None,)
    cache_requests: float = 4.0
    rate_multipliers: tuple[float, ...] = (1.0, 2.0, 4.0)

    def __post_init__(self) -> None:
        if self.rates is not None and (not self.rates or any(r <= 0 for r in self.rates)):
            raise ValueError(f"scenario {self.name}: request rates must be > 0, got {self.rates}")
        if not self.rate_multipliers or any(m <= 0 for m in self.rate_multipliers):
            raise ValueError(f"scenario {self.name}: rate multipliers must be > 0, got {self.rate_multipliers}")
        if not set(self.modes) <= set(MODES) or not self.modes:
            raise ValueError(f"scenario {self.name}: modes must be among {MODES}, got {self.modes}")
        if any(m is not None and m <= 0 for m in self.links_mbit):
            raise ValueError(f"scenario {self.name}: link rates must be > 0 Mbit/s")
        if self.cache_requests <= 0:
            raise ValueError(f"scenario {self.name}: cache_requests must be > 0")

    @property
    def shaped(self) -> bool:
        return any(m is not None for m in self.links_mbit)


@dataclass(frozen=True)
class BenchConfig:
    """Everything but the scenarios: model, data, load shape, SLOs, where calibrations are cached."""

    model: str = str(BUNDLED_MODEL)
    calib: str = str(BUNDLED_CALIB)
    data: str = str(BUNDLED_HELDOUT)
    build_dir: str = str(REPO_ROOT / ".cache" / "bench-serve")
    zeroc_models: dict[float, str] = field(default_factory=dict)  # budget -> an already calibrated model
    load: LoadSpec = field(default_factory=LoadSpec)
    slo: SLO = field(default_factory=SLO)
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    block_size: int = 16
    timeout_s: float = 900.0
    progress: bool = True


@dataclass
class Results:
    """Rows (one per measured point) and the configurations that could not run, with why."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    topology: dict[str, str] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)  # how automatic rates were chosen


def make_topology(scn: Scenario) -> Topology:
    """Loopback, or for a shaped scenario network namespaces (falling back to the proxy shaper)."""
    if not scn.shaped:
        return Loopback()
    from zeroc.bench.serve.netns import NetnsLink, NetnsUnavailable

    try:
        return NetnsLink()
    except NetnsUnavailable as exc:
        print(f"network namespaces unavailable ({exc}); shaping with the application-level proxy",
              file=sys.stderr)
        return ShapedProxy()


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr)


def _record_row(rec: RequestRecord) -> dict:
    """A request's outcome without its per-token times (kept small enough to commit)."""
    row = {"prompt_tokens": rec.prompt_tokens, "output_tokens": rec.output_tokens, "scheduled_s": rec.scheduled_s,
           "sent_s": round(rec.sent_s, 4), "error": rec.error, "queue_ms": round(rec.queue_ms, 2),
           "preemptions": rec.preemptions, "kv_bytes_received": rec.kv_bytes_received,
           "cached_prefix_tokens": rec.cached_prefix_tokens}
    if rec.ok:
        row.update(ttft_ms=round(rec.ttft_s * 1000, 2), e2e_ms=round(rec.e2e_s * 1000, 2),
                   tpot_ms=round(rec.tpot_s * 1000, 3))
    return row


class Bench:
    """Runs scenarios against stacks it starts (`run_scenario`) or a running service (`run_target`)."""

    def __init__(self, cfg: BenchConfig, methods: list[Method]):
        from zeroc.tokenizer import Tokenizer

        self.cfg, self.methods = cfg, methods
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        self.tokens = text_tokens(self.tokenizer, cfg.data)
        self.results = Results()

    def _points(self, workload: str, rate: float, ctx: int):
        load = self.cfg.load if self.cfg.load.kind == "trace" else replace(self.cfg.load, rate=rate)
        offsets, trace = arrivals(load)
        spec = preset(workload, ctx, self.cfg.max_prompt_tokens, self.cfg.max_output_tokens)
        return build_requests(spec, self.tokens, len(offsets), ctx, self.tokenizer.bos_id, load.seed, trace), offsets

    def _measure(self, address: str, requests, offsets, desc: str, ident: dict) -> None:
        bar = _bar(len(requests), desc, self.cfg.progress)
        try:
            records = run_load(address, requests, offsets, self.cfg.timeout_s, bar)
        finally:
            if bar is not None:
                bar.close()
        summary = summarize(records, self.cfg.slo)
        self.results.rows.append({**ident, "summary": summary.to_dict(),
                                  "requests": [_record_row(r) for r in records]})
        if self.cfg.progress:
            print(f"{desc}: {summary.completed}/{len(records)} ok, mean JCT {summary.e2e.mean:.0f} ms, "
                  f"p99 {summary.e2e.p99:.0f} ms, TTFT {summary.ttft.mean:.0f} ms, "
                  f"{summary.request_throughput:.3f} req/s", file=sys.stderr, flush=True)

    def run_target(self, address: str, workload: str, rates: tuple[float, ...]) -> None:
        """Drive an already running decode service (its context length from GetModelInfo)."""
        from zeroc.client import Client, ClientError

        try:
            with Client(address, timeout=30) as client:
                ctx = client.model_info().max_context
        except ClientError as exc:
            raise ZeroCError(f"{address}: {exc}") from None
        self.results.topology["target"] = f"a running service at {address}"
        for rate in rates:
            requests, offsets = self._points(workload, rate, ctx)
            warm_up(address, requests[0])
            self._measure(address, requests, offsets, f"target {workload} @{rate:g}/s",
                          {"scenario": "target", "workload": workload, "mode": "target", "method": "target",
                           "rate": rate, "link_mbit": None})

    def _cache_bytes(self, scn: Scenario, ctx: int) -> int:
        return int(scn.cache_requests * ctx * kv_bytes_per_token(self.cfg.model))

    def _start_stacks(self, scn: Scenario, mode: str, topology: Topology, ctx: int) -> dict[str, ServiceStack]:
        stacks: dict[str, ServiceStack] = {}
        cache_bytes = self._cache_bytes(scn, ctx)
        for method in self.methods:
            ident = {"scenario": scn.name, "mode": mode, "method": method.name}
            reason = None if mode in method.modes else f"{method.name} runs {'/'.join(method.modes)} only"
            if reason:
                self.results.skipped.append({**ident, "reason": reason})
                continue
            model_dir = prepare_model(method, self.cfg.model, self.cfg.calib, self.cfg.build_dir,
                                      self.cfg.zeroc_models)
            # Plain and ZeroC caches are sized in blocks; only KV policies need the byte budget.
            args = capacity_args(model_dir, cache_bytes, self.cfg.block_size, uses_kv_policy(method))
            try:
                stacks[method.name] = ServiceStack(StackPlan(method, mode, model_dir, tuple(args)), topology).start()
            except RuntimeError as exc:
                self.results.skipped.append({**ident, "reason": f"did not start: {str(exc)[-600:]}"})
        return stacks

    def run_scenario(self, scn: Scenario) -> None:
        ctx = ModelConfig.from_hf(json.loads((Path(self.cfg.model) / "config.json").read_text())).max_position_embeddings
        topology = make_topology(scn)
        self.results.topology[scn.name] = topology.describe()
        try:
            for mode in scn.modes:
                self._run_mode(scn, mode, topology, ctx)
        finally:
            topology.close()

    def _auto_rates(self, scn: Scenario, mode: str, stacks: dict[str, ServiceStack], ctx: int) -> tuple[float, ...]:
        """`scn.rate_multipliers` / J, J the mean JCT of two requests sent one at a time (unshaped link)."""
        name = "none" if "none" in stacks else next(iter(stacks))
        requests = self._points(scn.workload, 1.0, ctx)[0][:2]
        jct = [run_load(stacks[name].address, [r], [0.0], self.cfg.timeout_s)[0] for r in requests]
        if not all(r.ok for r in jct):
            raise ZeroCError(f"rate probe on {name} failed: {[r.error for r in jct]}")
        j = sum(r.e2e_s for r in jct) / len(jct)
        rates = tuple(round(m / j, 4) for m in scn.rate_multipliers)
        self.results.probes.append({"scenario": scn.name, "mode": mode, "method": name, "jct_s": round(j, 4),
                                    "rates": rates})
        return rates

    def _run_mode(self, scn: Scenario, mode: str, topology: Topology, ctx: int) -> None:
        stacks = self._start_stacks(scn, mode, topology, ctx)
        if not stacks:
            return
        try:
            first = self._points(scn.workload, 1.0, ctx)[0][0]
            for stack in stacks.values():
                warm_up(stack.address, first)
            topology.set_link(None)
            rates = scn.rates or self._auto_rates(scn, mode, stacks, ctx)
            for link in scn.links_mbit:
                topology.set_link(link)
                for rate in rates:
                    requests, offsets = self._points(scn.workload, rate, ctx)
                    for name, stack in stacks.items():
                        where = f" {link:g} Mbit/s" if link is not None else ""
                        self._measure(stack.address, requests, offsets,
                                      f"{scn.name}/{mode}{where} {name} @{rate:g}/s",
                                      {"scenario": scn.name, "workload": scn.workload, "mode": mode, "method": name,
                                       "rate": rate, "link_mbit": link,
                                       "cache_bytes": self._cache_bytes(scn, ctx)})
        finally:
            for stack in stacks.values():
                stack.close()
