"""`zeroc bench engine`: the Engine end to end on random weights, against ceilings measured in the same run.

Each method (`none`, `zeroc-fold-R`, `zeroc-rotate-R`) is a random-init model of one shape (the
bundled model's or Llama-3-8B's, `--layers` of them): ZeroC methods keep R Q/K dims (fold: the first
R/2 RoPE pairs of every KV head; rotate: random bases to R dims) and R V dims in every layer; a
`-tier-S-W` suffix adds a token tier (S sinks and W recent tokens at full rank, zeroc/tier.py). Rounds
interleave the methods, so drift in the machine's speed hits all of them alike. Every round runs
`batch` requests of `prompt` random tokens for `new` tokens (greedy, or sampled with `--temperature` and
`--top-p`) through a fresh Engine and reports:

- prefill tokens/s, from the first step until every request has its first token, and its MFU: model
  FLOPs (2 x matmul weights per token plus causal attention) over the GEMM rate measured here;
- decode step ms (median, p90) over the steps after that;
- the decode floor: the bytes a step must read once (every weight but the embedding table, plus the
  KV of every running sequence at that step's context, a tier's full-rank rows included) over the copy
  rate measured here; step/floor;
- host ms per step: step wall time minus device time. Device time is the span of the step's device
  work (forward and sampling): CUDA events around it on CUDA (which counts device idle gaps inside
  the forward as device time), the wall time of that code on the CPU (which runs synchronously);
- device syncs per step, counted on one extra decode step that is not timed: on CUDA every operation
  `torch.cuda.set_sync_debug_mode("warn")` warns about (item, tolist, pageable copies, synchronize);
  on the CPU, where nothing syncs, every call that reads tensor values to the host (item, tolist,
  bool/int/float of a tensor, numpy), the points that would sync on a device;
- each method's decode step over the uncompressed one (`none`) of the same scheduler, round by round.

`--schedulers sync async` runs every method both step by step and running ahead (the engine's
async_scheduling), interleaved; an async row is named "<method> async". `--profile` runs one decode step of
each method under torch's profiler instead of its last timed one and prints its ops by self device time
(zeroc.bench.step_costs.profile_step; kernels a CUDA graph replays included): where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from zeroc.bench.forward import machine_description
from zeroc.bench.step_costs import DeviceTimer, count_syncs, profile_step
from zeroc.caches import sequence_blocks
from zeroc.config import (BUNDLED_MODEL, AttentionCompression, CacheConfig, LayerCompression, ModelConfig,
                          RopeConfig, SchedulerConfig, requested_dtype)
from zeroc.dtypes import parse_dtype
from zeroc.engine import Engine
from zeroc.kv_cache import layer_shapes
from zeroc.loader import LoadedModel, read_config
from zeroc.model import Transformer
from zeroc.sampling import SamplingParams
from zeroc.step_clock import PHASES, NullClock, StepClock
from zeroc.tokenizer import Tokenizer
from zeroc_kernels.attention import select_backend

SHAPES = ("bundled", "llama3-8b")
LLAMA3_8B = ModelConfig(vocab_size=8192, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                        rope=RopeConfig(theta=500000.0), bos_token_id=0, eos_token_id=1, dtype="bfloat16")


@dataclass(frozen=True)
class EngineBenchSpec:
    device: str = "cpu"
    shape: str = "bundled"
    layers: int | None = None  # None: the shape's own
    batch: int = 4
    prompt: int = 64
    new: int = 16
    methods: tuple[str, ...] = ("none", "zeroc-fold-32", "zeroc-rotate-32")
    rounds: int = 2
    max_batched_tokens: int = 8192
    enforce_eager: bool = False
    schedulers: tuple[str, ...] = ("sync",)  # "sync", "async" (scheduler.async_scheduling)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    profile: bool = False  # one decode step under torch's profiler (in place of the last timed one)
    dtype: str = "auto"  # the weights' and KV's: auto = bfloat16 on CUDA, float32 on the CPU

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        for name in ("batch", "prompt", "new", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        least = 3 + self.profile  # prefill's token, one timed decode step, the counted one, the profiled one
        if self.new < least:
            raise ValueError(f"new must be >= {least} (the first token comes from prefill; then at least one timed "
                             "decode step, the counted one" + (", the profiled one)" if self.profile else ")"))
        for m in self.methods:
            parse_method(m, None)
        if not self.schedulers or set(self.schedulers) - {"sync", "async"}:
            raise ValueError(f"schedulers must be sync and/or async, got {self.schedulers!r}")
        self.sampling(1)  # ValueError for a temperature or top_p out of range
        requested_dtype(self.dtype)  # ValueError naming the choices

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return parse_dtype(self.dtype)

    def sampling(self, new: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=new, temperature=self.temperature, top_p=self.top_p, ignore_eos=True)


@dataclass(frozen=True)
class BenchMethod:
    """A `--methods` name: "none", "zeroc-{fold|rotate}-R", or either with a token tier of S sinks and W recent
    tokens at full rank, "zeroc-fold-R-tier-S-W"."""

    mode: str | None  # None: uncompressed
    rank: int
    sinks: int = 0
    recent: int = 0


def parse_method(name: str, head_dim: int | None) -> BenchMethod:
    """The method `name` names (see `BenchMethod`) at `head_dim` (None: any). ValueError otherwise."""
    if name == "none":
        return BenchMethod(None, head_dim or 0)
    parts = name.split("-")
    tier = parts[3:] if len(parts) == 6 and parts[3] == "tier" else None
    if (len(parts) != 3 and tier is None) or parts[0] != "zeroc" or parts[1] not in ("fold", "rotate") \
            or not all(x.isdigit() for x in [parts[2], *(tier or [])[1:]]):
        raise ValueError(f"methods: expected none, zeroc-fold-R, zeroc-rotate-R or either with -tier-S-W, got {name!r}")
    rank = int(parts[2])
    if rank < 2 or rank % 2 or (head_dim is not None and rank > head_dim):
        raise ValueError(f"methods: {name!r} needs an even rank in [2, head_dim]")
    sinks, recent = (int(tier[1]), int(tier[2])) if tier else (0, 0)
    if tier and sinks + recent == 0:
        raise ValueError(f"methods: {name!r} keeps no tier token")
    return BenchMethod(parts[1], rank, sinks, recent)


def base_config(spec: EngineBenchSpec) -> ModelConfig:
    cfg = read_config(BUNDLED_MODEL) if spec.shape == "bundled" else LLAMA3_8B
    need = spec.prompt + spec.new + 1
    return ModelConfig(**{**cfg.__dict__, "num_hidden_layers": spec.layers or cfg.num_hidden_layers,
                          "max_position_embeddings": max(cfg.max_position_embeddings, need)})


def method_config(base: ModelConfig, method: str) -> ModelConfig:
    m = parse_method(method, base.head_dim)
    if m.mode is None:
        return base
    kv, rank = base.num_key_value_heads, m.rank
    layer = (LayerCompression(tuple(tuple(range(rank // 2)) for _ in range(kv)), rank) if m.mode == "fold"
             else LayerCompression((), rank, "rotate", rank))
    comp = AttentionCompression((layer,) * base.num_hidden_layers, f"bench-{method}", rank / base.head_dim,
                                f"zeroc-{m.mode}", m.sinks, m.recent)
    return ModelConfig(**{**base.__dict__, "compression": comp})


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights (normal, std 0.02; norms 1) of `cfg`, made on the device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()
    model.backend = select_backend("auto", device)  # as the loader does: Triton on CUDA
    return model.eval().requires_grad_(False)


# -- ceilings measured in the same run ---------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_s(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in the model's dtype."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_s(lambda: a @ b, device)


def copy_rate(device: torch.device) -> float:
    """Bytes/s read plus written by a device copy."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / _best_s(lambda: dst.copy_(src), device)


# -- what a run costs in FLOPs and bytes -----------------------------------------------------------------

def matmul_weight_bytes(model: Transformer) -> tuple[int, int]:
    """(elements, bytes) of every weight a decode step reads in full: all but the embedding table, of
    which a step reads a row per token (a tied lm_head is read in full, so then it counts)."""
    embed = model.model.embed_tokens.weight
    skip = set() if model.lm_head.weight is embed else {id(embed)}
    params = [p for p in model.parameters() if id(p) not in skip]  # parameters() yields a tied one once
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return item * sum(s.kv_heads * (s.k_dim + s.v_dim) for s in layer_shapes(cfg))


def kv_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int) -> int:
    """KV bytes a decode step reads for one sequence of `tokens` tokens: every token's (compressed) rows, plus
    a token tier's full-rank dims of its min(tokens, S + W) sinks and recent tokens."""
    total = tokens * kv_bytes_per_token(cfg, dtype)
    if cfg.has_tier:
        item = torch.empty((), dtype=dtype).element_size()
        extra = sum(cfg.kv_geometry(i)[0] * sum(cfg.tier_geometry(i)) for i in range(cfg.num_hidden_layers))
        total += min(tokens, cfg.compression.sinks + cfg.compression.recent) * extra * item
    return total


def prefill_flops(cfg: ModelConfig, weight_elems: int, batch: int, prompt: int) -> float:
    """2 x weights per token, plus causal QK^T and PV (half of the full square) per layer."""
    attn = 0
    for layer in range(cfg.num_hidden_layers):
        kv, qk_dim, v_dim = cfg.kv_geometry(layer)
        attn += 2 * cfg.num_attention_heads * (qk_dim + v_dim) * prompt * prompt / 2
    return batch * (2 * weight_elems * prompt + attn)


# -- one run of one method ---------------------------------------------------------------------------------

def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_once(loaded: LoadedModel, spec: EngineBenchSpec, prompts: list[list[int]], rates: dict,
             weights: tuple[int, int], scheduler: str = "sync") -> dict:
    """One fresh Engine through `prompts`: prefill, timed decode steps, one counted step, the rest. `weights`: the
    model's `matmul_weight_bytes`, counted before any Engine released its plain weights."""
    device = torch.device(spec.device)
    cfg = loaded.config
    blocks = spec.batch * sequence_blocks(cfg, 16, spec.prompt + spec.new + 1) + 1  # + the graphs' pad block
    ahead = scheduler == "async"
    engine = Engine(loaded, CacheConfig(16, blocks),
                    SchedulerConfig(max_num_seqs=spec.batch, max_num_batched_tokens=spec.max_batched_tokens,
                                    enforce_eager=spec.enforce_eager, async_scheduling=ahead),
                    release_weights=True)  # as the services run it
    timer = DeviceTimer(device)
    engine.device_timer = timer
    params = spec.sampling(spec.new)
    for p in prompts:
        engine.add_request(p, params)
    started: set[str] = set()
    _sync(device)
    t0 = time.perf_counter()
    while len(started) < len(prompts):
        started.update(o.request_id for o in engine.step() if o.token_ids)
    prefill_s = time.perf_counter() - t0
    walls: list[float] = []
    first_decode = len(timer._pending) + len(timer.times)
    engine.clock = clock = StepClock()
    for _ in range(spec.new - 2 - spec.profile):  # the last step is counted, not timed; one more profiled
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    device_s = timer.collect()[first_decode:first_decode + len(walls)]
    engine.device_timer, engine.clock = None, NullClock()
    profile = profile_step(engine.step, device) if spec.profile else []
    waits = engine.host_waits
    with count_syncs(device) as syncs:
        engine.step()
    if device.type == "cuda":  # the engine waits on an event for its pinned copy of the ids: no sync warning
        syncs[0] += engine.host_waits - waits
    while engine.has_unfinished():
        engine.step()
    elems, weight_bytes = weights
    dtype = next(loaded.model.parameters()).dtype
    # decode step j reads the KV of prompt + j + 1 tokens per sequence (its new token included); running
    # ahead, the prefill loop above also launched decode step 1
    floors = [(weight_bytes + spec.batch * kv_bytes(cfg, dtype, spec.prompt + j + 1)) / rates["copy_bytes_s"]
              for j in range(1 + ahead, len(walls) + 1 + ahead)]
    step_ms = statistics.median(walls) * 1e3
    return {
        "prefill_tokens_s": spec.batch * spec.prompt / prefill_s,
        "prefill_mfu": prefill_flops(cfg, elems, spec.batch, spec.prompt) / prefill_s / rates["gemm_flop_s"],
        "step_ms": step_ms,
        "step_mean_ms": statistics.fmean(walls) * 1e3,  # what the phases' means add up to
        "step_p90_ms": _pct(walls, 0.9) * 1e3,
        "device_ms": statistics.median(device_s) * 1e3,
        "host_ms": statistics.median(w - d for w, d in zip(walls, device_s)) * 1e3,
        "floor_ms": statistics.median(floors) * 1e3,
        "step_over_floor": step_ms / (statistics.median(floors) * 1e3),
        "syncs_per_step": syncs[0],
        "phases_ms": clock.ms_per_step(),
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype),
        "profile": profile,
    }


def run_engine_bench(spec: EngineBenchSpec, progress: bool = True) -> dict:
    device = torch.device(spec.device)
    dtype = spec.torch_dtype()
    base = base_config(spec)
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL)
    models = {m: LoadedModel(random_model(method_config(base, m), device, dtype, spec.seed), method_config(base, m),
                             tokenizer, BUNDLED_MODEL) for m in spec.methods}
    gen = torch.Generator().manual_seed(spec.seed)
    # token ids 2.. (0 and 1 are the bundled tokenizer's bos and eos)
    prompts = [torch.randint(2, base.vocab_size, (spec.prompt,), generator=gen).tolist() for _ in range(spec.batch)]
    rates = {"gemm_flop_s": gemm_rate(device, dtype), "copy_bytes_s": copy_rate(device)}
    warm = EngineBenchSpec(**{**spec.__dict__, "batch": min(2, spec.batch), "new": 3, "profile": False})
    weights = {m: matmul_weight_bytes(models[m].model) for m in spec.methods}
    for m in spec.methods:  # compiles kernels (and captures graphs) before anything is timed
        run_once(models[m], warm, prompts[: warm.batch], rates, weights[m])
    rows = []
    todo = [(r, m, sch) for r in range(spec.rounds) for sch in spec.schedulers for m in spec.methods]
    for r, m, sch in tqdm(todo, desc="engine bench", disable=not progress):
        rows.append({"round": r, "method": m, "scheduler": sch,
                     **run_once(models[m], spec, prompts, rates, weights[m], sch)})
    return {"spec": spec.__dict__, "dtype": str(dtype).removeprefix("torch."), "machine": _machine(device),
            "rates": rates, "rows": rows, "summary": summarize(rows, spec.methods, spec.schedulers)}


def _machine(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine_description()


def summarize(rows: list[dict], methods: tuple[str, ...], schedulers: tuple[str, ...] = ("sync",)) -> dict:
    """Per method and scheduler ("<method>" or "<method> async"): medians over rounds, and its step over the
    uncompressed step of the same round and scheduler."""
    out = {}
    keys = ("prefill_tokens_s", "prefill_mfu", "step_ms", "step_mean_ms", "step_p90_ms", "device_ms", "host_ms",
            "floor_ms", "step_over_floor", "syncs_per_step")
    for sch in schedulers:
        base = {r["round"]: r["step_ms"] for r in rows if r["method"] == "none" and r["scheduler"] == sch}
        for m in methods:
            mine = [r for r in rows if r["method"] == m and r["scheduler"] == sch]
            name = m if sch == "sync" else f"{m} async"
            out[name] = {k: statistics.median(r[k] for r in mine) for k in keys}
            out[name]["phases_ms"] = {p: statistics.median(r["phases_ms"][p] for r in mine) for p in PHASES}
            out[name]["profile"] = mine[-1]["profile"]  # the last round's
            if base:
                out[name]["step_over_none"] = [r["step_ms"] / base[r["round"]] for r in mine if r["round"] in base]
    return out


def _sampling_label(spec: dict) -> str:
    if spec["temperature"] == 0.0:
        return "greedy"
    return f"temperature {spec['temperature']:g}" + (f", top-p {spec['top_p']:g}" if spec["top_p"] < 1.0 else "")


def text_report(report: dict) -> str:
    s, rates = report["spec"], report["rates"]
    lines = [f"engine bench: {s['shape']} x {s['layers'] or 'all'} layers, batch {s['batch']}, prompt {s['prompt']}, "
             f"{s['new']} new ({_sampling_label(s)}), {report['dtype']}, {s['rounds']} rounds, {report['machine']}"
             f"{', eager' if s['enforce_eager'] else ''}",
             f"measured here: GEMM {rates['gemm_flop_s'] / 1e12:.2f} TFLOP/s, copy {rates['copy_bytes_s'] / 1e9:.1f} GB/s"
             " (read + written)",
             f"{'method':<24}{'prefill tok/s':>14}{'MFU':>7}{'step ms':>9}{'p90':>8}{'device':>8}{'host':>8}"
             f"{'floor':>8}{'step/floor':>11}{'syncs':>7}  step/none per round"]
    for m, r in report["summary"].items():
        ratios = " ".join(f"{x:.2f}" for x in r.get("step_over_none", []))
        lines.append(f"{m:<24}{r['prefill_tokens_s']:>14,.0f}{r['prefill_mfu']:>7.1%}{r['step_ms']:>9.2f}"
                     f"{r['step_p90_ms']:>8.2f}{r['device_ms']:>8.2f}{r['host_ms']:>8.2f}{r['floor_ms']:>8.3f}"
                     f"{r['step_over_floor']:>11.1f}{r['syncs_per_step']:>7.0f}  {ratios}")
    lines.append("where a decode step's wall time goes, ms (zeroc.step_clock: on a GPU forward and sample are "
                 "launch time, wait the device's rest)")
    lines.append(f"{'method':<24}" + "".join(f"{p:>12}" for p in PHASES))
    for m, r in report["summary"].items():
        lines.append(f"{m:<24}" + "".join(f"{r['phases_ms'][p]:>12.3f}" for p in PHASES))
    for m, r in report["summary"].items():
        if r["profile"]:
            lines.append(f"{m}: one decode step's top ops by self {'device' if 'cuda' in s['device'] else 'host'} ms")
            lines += [f"  {p['ms']:>9.3f} ms {p['calls']:>5}x  {p['name'][:100]}" for p in r["profile"]]
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EngineBenchSpec()
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--shape", choices=SHAPES, default=d.shape, help="model shape (random weights)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--batch", type=int, default=d.batch, help="requests, all running together")
    p.add_argument("--prompt", type=int, default=d.prompt, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=d.new, help="tokens per request")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--methods", nargs="+", default=list(d.methods),
                   help="none, zeroc-fold-R, zeroc-rotate-R; a -tier-S-W suffix adds a token tier of S sinks and W "
                        "recent tokens")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved rounds of every method")
    p.add_argument("--max-batched-tokens", type=int, default=d.max_batched_tokens)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--schedulers", nargs="+", choices=["sync", "async"], default=list(d.schedulers),
                   help="step by step, running ahead (scheduler.async_scheduling), or both interleaved")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one decode step per method: its ops by device time (host time on the CPU)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    spec = EngineBenchSpec(device=args.device, shape=args.shape, layers=args.layers, batch=args.batch,
                           prompt=args.prompt, new=args.new, methods=tuple(args.methods), rounds=args.rounds,
                           max_batched_tokens=args.max_batched_tokens, enforce_eager=args.enforce_eager,
                           schedulers=tuple(args.schedulers), temperature=args.temperature, top_p=args.top_p,
                           profile=args.profile, dtype=args.dtype)
    report = run_engine_bench(spec, progress=not args.json)
    print(json.dumps(report, indent=2) if args.json else text_report(report))
    return 0
