"""The whole serving stack on one device, in one call: real prefill and decode service processes.

For the bundled model and a ZeroC-compressed one (fold and rotate layers, per-KV-head ranks and a
token tier, built from the bundled model's calibration statistics), it starts, all on one device:

- `grpc`: `zeroc serve prefill` and `zeroc serve decode --prefill ... --kv-transport grpc`;
- `auto`: the same prefill service and a decode service with `--kv-transport auto`, which picks CUDA
  IPC when both processes share one GPU (gRPC on the CPU); this decode service also runs ahead (async
  scheduling), so the modes compare the two schedulers on the device too;
- `colocated`: `zeroc serve decode --colocated` (prefills itself, ships no KV).

Per mode and model it checks that every prompt's greedy tokens equal those of a direct Engine on the
same device (in bfloat16, a run may part from it only where the float32 model's logits of the two tokens
are within two bfloat16 spacings: a tie that either rounding may break, `near_tie`), and that the KV bytes
the decode service received (Usage.kv_bytes_received) equal the ranks summed over layers and KV heads x
the prompt tokens the prefill service computed x the dtype's bytes (plus the tier's full-width rows), and 0
colocated. It reports TTFT and TPOT as the client sees
them (one request at a time) and pass/fail per mode; a mode that fails is reported, never fatal.

A true two-process NCCL transfer needs two GPUs: on one GPU `auto` picks CUDA IPC, so NCCL between
processes is not exercised here.

    python benchmarks/gpu_serve.py --device cuda              # about 2 minutes on one H200
    python benchmarks/gpu_serve.py --device cpu --quick       # the CPU smoke run (tests/benchmarks)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from zeroc.client import Client
from zeroc.config import BUNDLED_CALIB, BUNDLED_MODEL, AttentionCompression, CacheConfig, ModelConfig
from zeroc.engine import Engine
from zeroc.loader import load_model, save_model
from zeroc.sampling import SamplingParams
from zeroc.stack import ServiceProcess

MODES = ("grpc", "auto", "colocated")
NCCL_NOTE = ("a true two-process NCCL transfer needs two GPUs; on one GPU `auto` picks CUDA IPC, "
             "so NCCL between processes is not exercised here")
# (Q/K ranks, V ranks) per layer of the bundled model (6 layers, 2 KV heads of 64), fold and rotate
# alternating, per-KV-head ranks beside uniform ones (as the compressed-stack tests build it).
HEAD_RANKS = [((24, 40), (8, 24)), (32, 16), ((40, 24), 16), ((24, 40), (8, 24)), (32, 16), (32, (24, 8))]
PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())", "A list comprehension is",
           "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints the sum of two numbers",
           "Exceptions are raised when " * 12, "class Stack:\n    def __init__(self):\n        self.items = []\n" * 6]


def build_compressed(out: Path, calib_tokens: int) -> Path:
    """The bundled model with `HEAD_RANKS` (fold and rotate layers, per-KV-head ranks) and a token tier of
    2 sinks and 8 recent tokens, from statistics of `calib_tokens` tokens of the bundled calibration text."""
    from zeroc.compression.calibrate import collect_statistics, compute_factors
    from zeroc.compression.fold import build_compressed as fold
    from zeroc.data import read_eval_tokens

    base = load_model(BUNDLED_MODEL)
    calib = read_eval_tokens(base.tokenizer, BUNDLED_CALIB, calib_tokens)[:calib_tokens].view(-1, 256)
    factors = compute_factors(base.model, collect_statistics(base.model, calib, progress=False, sample_tokens=128))
    layers = tuple(f.layer_compression(qk, v, ("fold", "rotate")[i % 2])
                   for i, (f, (qk, v)) in enumerate(zip(factors, HEAD_RANKS)))
    layout = AttentionCompression(layers, "gpu-serve-heads-tier", 0.375, "zeroc-auto", sinks=2, recent=8)
    return save_model(fold(base.model, factors, layout), base.tokenizer, out)


def expected_kv_bytes(cfg: ModelConfig, prompt_tokens: int, item: int) -> int:
    """Bytes a decode service receives for a prompt: every computed token's row (the ranks summed over
    layers and KV heads; the decode service runs the last prompt token itself), plus the tier's sinks and
    recent tokens at full width."""
    n = prompt_tokens - 1
    dims = sum(sum(qk) + sum(v) for qk, v in map(cfg.head_ranks, range(cfg.num_hidden_layers)))
    full = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    tier = min(n, cfg.compression.sinks + cfg.compression.recent) if cfg.has_tier else 0
    return item * (n * dims + tier * (full - dims))


def start_services(model_dir: str, device: str, dtype: str, backend: str) -> dict[str, ServiceProcess | Exception]:
    """One prefill service, a decode service per transport using it, and a colocated one, started together."""
    common = ["--model", model_dir, "--device", device, "--dtype", dtype, "--redis-url", "off", "--kv-store-mb", "0"]
    base_env = {"ZEROC_TRANSFER_CHUNK_BYTES": "65536", "ZEROC_ATTENTION_BACKEND": backend}
    procs: dict[str, ServiceProcess | Exception] = {}

    def start(kind: str, args: list[str], env: dict | None = None) -> ServiceProcess | Exception:
        try:
            svc = ServiceProcess(kind, [*common, *args], env={**base_env, **(env or {})})
            svc.wait_serving()
            return svc
        except Exception as exc:  # reported per mode
            return exc

    with ThreadPoolExecutor(4) as pool:
        # The decode services run ahead by default on CUDA: the auto one does, the others step by step, so the
        # modes compare the two schedulers too
        step_by_step = {"ZEROC_SCHEDULER_ASYNC_SCHEDULING": "0"}
        colocated = pool.submit(start, "decode", ["--colocated"], step_by_step)
        prefill = start("prefill", ["--kv-transport", "auto"])
        procs["prefill"] = prefill
        decodes = {}
        if isinstance(prefill, ServiceProcess):
            ahead = {"auto": {"ZEROC_SCHEDULER_ASYNC_SCHEDULING": "1"}, "grpc": step_by_step}
            decodes = {m: pool.submit(start, "decode", ["--prefill", prefill.address, "--kv-transport", m],
                                      ahead[m]) for m in ("grpc", "auto")}
        for m in ("grpc", "auto"):
            procs[m] = decodes[m].result() if m in decodes else RuntimeError(f"prefill service: {prefill}")
        procs["colocated"] = colocated.result()
    return procs


def run_mode(address: str, prompts: list[str], new: int) -> list[dict]:
    """Each prompt alone, streamed: tokens, KV bytes received, TTFT and TPOT as the client sees them."""
    out = []
    with Client(address, timeout=120) as client:
        for prompt in prompts:
            t0 = time.perf_counter()
            first, tokens, end = None, [], None
            for item in client.stream(prompt, max_tokens=new, ignore_eos=True):
                if hasattr(item, "usage"):
                    end = item
                elif item.token_ids:
                    first = first or time.perf_counter()
                    tokens += item.token_ids
            done = time.perf_counter()
            out.append({"tokens": tokens, "kv_bytes": end.usage.kv_bytes_received, "finish": end.finish_reason,
                        "ttft_ms": ((first or done) - t0) * 1e3,
                        "tpot_ms": (done - (first or done)) / max(1, len(tokens) - 1) * 1e3})
    return out


def transport_chosen(svc: ServiceProcess, mode: str) -> str:
    """What the decode service logged it picked (`grpc` mode picks nothing: it is gRPC)."""
    if mode != "auto":
        return mode if mode == "grpc" else "none"
    found = re.findall(r'"transport": "([\w-]+)"', svc.log_tail(200_000))
    return found[-1] if found else "?"


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where `got` leaves `want` (None if equal): at 0 the decode service's own first
    step differs (the last prompt token, attended over the KV it received); later, a step's near tie may have
    rounded the other way."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 values (8 significant bits) at magnitude |x|."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def near_tie(oracle, prompt_ids: list[int], prefix: list[int], a: int, b: int) -> bool:
    """Whether tokens a and b, where two runs of the same half-precision model parted after `prefix`, were a
    tie at that precision: their logits in `oracle` (the model in float32, dense forward) differ by at most
    two bfloat16 spacings. The two runs compute that step differently (a disaggregated decode service runs
    the last prompt token as a decode step, a colocated one inside the prefill), so half-precision rounding
    may pick either; a larger gap is a real difference."""
    ids = torch.tensor([prompt_ids + prefix], device=oracle.lm_head.weight.device)
    with torch.no_grad():
        logits = oracle(ids)[0, -1].float()
    la, lb = float(logits[a]), float(logits[b])
    return abs(la - lb) <= 2 * bf16_ulp(max(abs(la), abs(lb)))


def tie_prompts(oracle, args: argparse.Namespace, direct: list, got: list[dict], firsts: list) -> list[int] | None:
    """Indices of the prompts whose tokens part from the direct engine's (at `firsts`, from `first_difference`)
    at a near tie (`near_tie`); None if any parts otherwise, or if the run is float32, where the tokens must
    be equal. oracle(): the model in float32, loaded when first needed."""
    parted = [(i, k) for i, k in enumerate(firsts) if k is not None]
    if parted and args.dtype == "float32":
        return None
    for i, k in parted:
        want, tokens = direct[i].token_ids, got[i]["tokens"]
        if k >= min(len(want), len(tokens)) or not near_tie(oracle(), direct[i].prompt_token_ids, want[:k],
                                                             tokens[k], want[k]):
            return None
    return [i for i, _ in parted]


def check_model(name: str, model_dir: str, args: argparse.Namespace) -> list[dict]:
    loaded = load_model(model_dir, dtype=args.dtype, device=args.device, attention_backend=args.backend)
    prompts = PROMPTS[:3] if args.quick else PROMPTS
    direct = Engine(loaded, CacheConfig()).generate(prompts, SamplingParams(max_new_tokens=args.new, ignore_eos=True))
    item = torch.empty((), dtype=next(loaded.model.parameters()).dtype).element_size()
    want_bytes = [expected_kv_bytes(loaded.config, len(r.prompt_token_ids), item) for r in direct]
    del loaded
    oracle = functools.cache(lambda: load_model(model_dir, dtype="float32", device=args.device).model)
    t0 = time.perf_counter()
    procs = start_services(model_dir, args.device, args.dtype, args.backend)
    print(f"{name}: services up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    try:
        for mode in MODES:
            svc = procs[mode]
            row = {"model": name, "mode": mode, "ok": False}
            try:
                if isinstance(svc, Exception):
                    raise svc
                got = run_mode(svc.address, prompts, args.new)
                tokens_ok = [g["tokens"] for g in got] == [r.token_ids for r in direct]
                firsts = [first_difference(g["tokens"], r.token_ids) for g, r in zip(got, direct)]
                bytes_want = [0] * len(got) if mode == "colocated" else want_bytes
                bytes_ok = [g["kv_bytes"] for g in got] == bytes_want
                ties = tie_prompts(oracle, args, direct, got, firsts)  # [] when equal
                row.update(ok=ties is not None and bytes_ok, tokens_equal_direct=tokens_ok, near_ties=ties,
                           first_difference=firsts,
                           kv_bytes_ok=bytes_ok,
                           kv_bytes=[g["kv_bytes"] for g in got], kv_bytes_expected=bytes_want,
                           ttft_ms=statistics.median(g["ttft_ms"] for g in got),
                           tpot_ms=statistics.median(g["tpot_ms"] for g in got),
                           transport=transport_chosen(svc, mode))
            except Exception as exc:  # one failing mode must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            rows.append(row)
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda svc: svc.stop(), [s for s in procs.values() if isinstance(s, ServiceProcess)]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model and KV dtype")
    p.add_argument("--backend", default="auto", help="attention backend of the direct engine and every service "
                   "(auto | torch | cpu | triton; triton on the CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--models", nargs="+", choices=["bundled", "zeroc-heads-tier"],
                   default=["bundled", "zeroc-heads-tier"])
    p.add_argument("--quick", action="store_true", help="3 short prompts, 4 new tokens, a smaller calibration")
    p.add_argument("--new", type=int, default=None, help="greedy tokens per prompt (default 32; 4 with --quick)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.new = args.new or (4 if args.quick else 32)
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"note: {NCCL_NOTE}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gpu-serve-") as tmp:
        zeroc_dir = build_compressed(Path(tmp) / "zeroc", 512 if args.quick else 2048)
        print(f"compressed model built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        models = {"bundled": str(BUNDLED_MODEL), "zeroc-heads-tier": str(zeroc_dir)}
        rows = [row for name in args.models for row in check_model(name, models[name], args)]
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": args.dtype, "new_tokens": args.new, "nccl": NCCL_NOTE, "rows": rows,
              "all_ok": all(r["ok"] for r in rows), "seconds": time.perf_counter() - started}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"gpu_serve on {report['device']} ({args.dtype}), {args.new} new tokens; {NCCL_NOTE}")
        print(f"{'model':<18}{'mode':<11}{'result':<7}{'transport':<11}{'tokens':<8}{'kv bytes':<9}"
              f"{'TTFT ms':>9}{'TPOT ms':>9}")
        for r in rows:
            if "error" in r:
                print(f"{r['model']:<18}{r['mode']:<11}FAIL   {r['error']}")
                continue
            print(f"{r['model']:<18}{r['mode']:<11}{'pass' if r['ok'] else 'FAIL':<7}{r['transport']:<11}"
                  f"{'same' if r['tokens_equal_direct'] else 'tie' if r['near_ties'] else 'DIFFER':<8}"
                  f"{'ok' if r['kv_bytes_ok'] else 'WRONG':<9}"
                  f"{r['ttft_ms']:>9.1f}{r['tpot_ms']:>9.2f}")
            if not r["tokens_equal_direct"]:
                print(f"{'':<29}first different token per prompt: {r['first_difference']}; at a near tie "
                      f"(float32 logits within 2 bfloat16 spacings): {r['near_ties'] or 'no'}")
            if not r["kv_bytes_ok"]:
                print(f"{'':<29}kv bytes {r['kv_bytes']} expected {r['kv_bytes_expected']}")
        print(f"all pass: {report['all_ok']} ({report['seconds']:.0f} s)")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
