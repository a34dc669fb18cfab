"""`zeroc bench serve`: its flags and what the command does with them."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

from zeroc.bench.serve.load import LoadSpec
from zeroc.bench.serve.methods import MODES, ZEROC_METHODS, all_methods, method_by_name
from zeroc.policies import POLICY_NAMES
from zeroc.bench.serve.metrics import SLO
from zeroc.bench.serve.workloads import WORKLOADS
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL, REPO_ROOT, ZeroCError

DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"
SCENARIOS = ("memory", "network")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                   help="memory: decode cache fixed in bytes; network: prefill -> decode link shaped")
    p.add_argument("--target", default=None, help="HOST:PORT of a running decode service (no stack is started)")
    p.add_argument("--workload", choices=WORKLOADS, default="long", help="request shapes (default: long)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="KV methods to compare (default: all: "
                        f"{', '.join(m.name for m in ZEROC_METHODS)} and the KV policies {', '.join(POLICY_NAMES)} "
                        "at their benchmark budgets; unavailable ones are reported as not run)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="memory scenario modes")
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="request rates swept, requests/s (memory scenario and --target; default: automatic, "
                        "--rate-multipliers / J, J the JCT of one request alone on the uncompressed stack)")
    p.add_argument("--rate-multipliers", type=float, nargs="+", default=[0.75, 1.5, 3.0],
                   help="automatic memory-scenario rates, in units of 1 / J")
    p.add_argument("--network-rates", type=float, nargs="+", default=None,
                   help="request rates, network scenario (default: automatic, --network-rate-multiplier / J)")
    p.add_argument("--network-rate-multiplier", type=float, default=2.0)
    p.add_argument("--links-mbit", type=float, nargs="+", default=[100.0, 10.0], help="link rates, network scenario")
    # 2, not 4: with 4 the disaggregated decode cache never filled on the 2-vCPU VM (the prefill
    # service was the bottleneck; docs/benchmarks.md, "Serving").
    p.add_argument("--cache-requests", type=float, default=2.0,
                   help="memory scenario: decode KV capacity in full-context uncompressed requests")
    p.add_argument("--num-requests", type=int, default=6, help="requests per measured point")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per point (instead of a count)")
    p.add_argument("--arrival", choices=["poisson", "gamma", "trace"], default="poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    p.add_argument("--trace", default=None, help='JSONL trace: {"timestamp": s, "prompt_tokens"?, "output_tokens"?}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="cap prompt lengths (quick runs)")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap output lengths (quick runs)")
    # About twice the bundled model's unloaded TTFT and TPOT for long prompts on the 2-vCPU VM.
    p.add_argument("--slo-ttft-ms", type=float, default=10_000.0, help="goodput SLO on TTFT (0: none)")
    p.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput SLO on TPOT (0: none)")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput SLO on JCT")
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="base model directory")
    p.add_argument("--calib", default=str(BUNDLED_CALIB), help="calibration text for the ZeroC methods")
    p.add_argument("--data", default=str(BUNDLED_HELDOUT), help="text the prompts are cut from")
    p.add_argument("--build-dir", default=str(REPO_ROOT / ".cache" / "bench-serve"),
                   help="where calibrated models are cached")
    p.add_argument("--zeroc-model", action="append", default=[], metavar="BUDGET=DIR",
                   help="serve this already calibrated model for ZeroC at BUDGET instead of calibrating")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="report directory (serve.md, serve.json, PNGs)")
    p.add_argument("--from-json", default=None, metavar="SERVE_JSON",
                   help="measure nothing: render the report again from an earlier run's serve.json")
    p.add_argument("--json", action="store_true", help="print the goals and report paths as JSON")


def _config(args: argparse.Namespace):
    from zeroc.bench.serve.scenarios import BenchConfig

    if args.arrival == "trace" and not args.trace:
        raise ZeroCError("--arrival trace needs --trace FILE")
    load = LoadSpec(kind="trace" if args.trace else args.arrival, rate=1.0, burstiness=args.burstiness,
                    num_requests=args.num_requests, duration_s=args.duration, trace=args.trace, seed=args.seed)
    slo = SLO(*(v or None for v in (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)))
    for flag in ("max_prompt_tokens", "max_output_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ZeroCError(f"--{flag.replace('_', '-')} must be >= 1")
    return BenchConfig(model=args.model, calib=args.calib, data=args.data, build_dir=args.build_dir,
                       zeroc_models=_zeroc_models(args.zeroc_model), load=load, slo=slo, max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                       progress=True)


def _zeroc_models(items: list[str]) -> dict[float, str]:
    out = {}
    for item in items:
        budget, sep, path = item.partition("=")
        try:
            out[float(budget)] = path
        except ValueError:
            sep = ""
        if not sep or not path:
            raise ZeroCError(f"--zeroc-model {item!r}: expected BUDGET=DIR, e.g. 0.5=/tmp/zeroc-0.5")
    return out


def _opt(values: list[float] | None) -> tuple[float, ...] | None:
    return tuple(values) if values else None


def scenarios_from(args: argparse.Namespace) -> list:
    from zeroc.bench.serve.scenarios import Scenario

    out = []
    if "memory" in args.scenario:
        out.append(Scenario("memory", args.workload, tuple(args.modes), _opt(args.rates),
                            cache_requests=args.cache_requests, rate_multipliers=tuple(args.rate_multipliers)))
    if "network" in args.scenario:
        # A roomy cache: here only the link may be the bottleneck.
        out.append(Scenario("network", args.workload, ("disaggregated",), _opt(args.network_rates),
                            tuple(args.links_mbit), cache_requests=4 * args.cache_requests,
                            rate_multipliers=(args.network_rate_multiplier,)))
    return out


def _meta(args: argparse.Namespace, started: dt.datetime, wall_s: float) -> dict:
    from zeroc.eval.quality import machine_description

    load = (f"trace {args.trace}" if args.trace else f"{args.arrival} arrivals"
            + (f" (burstiness {args.burstiness:g})" if args.arrival == "gamma" else "")
            + (f", {args.duration:g} s per point" if args.duration else f", {args.num_requests} requests per point"))
    return {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_description(),
            "command": "zeroc bench serve " + " ".join(args.argv[2:]), "wall time": f"{wall_s / 60:.1f} min",
            "model": os.path.basename(args.model.rstrip("/")), "workload": args.workload, "load": load,
            "SLOs (goodput)": ", ".join(f"{name} <= {v:g} ms" for name, v in
                                        (("TTFT", args.slo_ttft_ms), ("TPOT", args.slo_tpot_ms),
                                         ("JCT", args.slo_e2e_ms)) if v) or "none",
            "services": "one process each, OMP_NUM_THREADS=1, fp32, block size 16"}


def _rerender(path: str, out: str) -> dict:
    from zeroc.bench.serve.report import write_report
    from zeroc.bench.serve.scenarios import Results

    try:
        raw = json.loads(open(path).read())
        results = Results(raw["rows"], raw["skipped"], raw["topology"], raw.get("probes", []))
    except (OSError, ValueError, KeyError) as exc:
        raise ZeroCError(f"{path}: not a serve.json of zeroc bench serve ({exc})") from None
    return write_report(results, raw["meta"], out)


def run(args: argparse.Namespace) -> int:
    from zeroc.bench.serve.report import write_report
    from zeroc.bench.serve.scenarios import Bench

    if args.from_json:
        return _print(args, _rerender(args.from_json, args.out))

    cfg = _config(args)  # every check before anything starts: bad flags cost nothing
    methods = [method_by_name(n) for n in args.methods] if args.methods else list(all_methods())
    scenarios = [] if args.target else scenarios_from(args)
    if args.target and (not args.rates or any(r <= 0 for r in args.rates)):
        raise ZeroCError(f"--target needs --rates, all > 0 (got {args.rates})")
    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    bench = Bench(cfg, methods)
    if args.target:
        bench.run_target(args.target, args.workload, tuple(args.rates))
    for scn in scenarios:
        bench.run_scenario(scn)
    return _print(args, write_report(bench.results, _meta(args, started, time.monotonic() - t0), args.out))


def _print(args: argparse.Namespace, paths: dict) -> int:
    report = json.loads(paths["json"].read_text())
    if args.json:
        print(json.dumps({"goals": report["goals"], "skipped": report["skipped"],
                          "paths": {k: str(v) for k, v in paths.items()}}))
    else:
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
        print(paths["markdown"].read_text().split("## Results")[0])
    return 0
