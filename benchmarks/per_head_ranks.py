"""Ranks per KV head vs one rank per layer, at equal KV bytes: quality, and what the head runs cost in time.

    python benchmarks/per_head_ranks.py [--budgets 0.25 0.375 0.5] [--mode auto] [--tokens 2048 8192]
                                        [--context 1024] [--batch 4] [--steps 8] [--plot PNG] [--json]

The bundled model is calibrated at both granularities with `zeroc calibrate`'s defaults (each measured once on
data/calib.txt, then compressed at every budget). Per layout: the KV fraction, the calibration's measured
KL(source || compressed), full-pass perplexity of the first N held-out tokens at ctx 1024 for each N in
`--tokens`, and, through the paged cache (the CPU path), one prefill of `--context` tokens and the mean decode
step of one engine running `--batch` sequences of `--context` prompt tokens. A layer with per-head ranks
attends once per run of equal-rank heads (zeroc/head_ranks.py); `--overhead-repeats` also times that cost
alone: every layer at Q/K 40, V 8 (rotate) against every layer split (48, 32) / 8 at the same bytes,
interleaved, best of N (calibrated layouts split only some layers).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from tqdm import tqdm


from zeroc.bench.forward import bench_prefill, engine_decode_step_s
from zeroc.compression.calibrate import ZeroCMethod, compress, measure
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL, CacheConfig
from zeroc.eval.perplexity import perplexity_full
from zeroc.data import read_eval_tokens
from zeroc.caches import sequence_blocks
from zeroc.loader import LoadedModel, load_model

BLOCK = 16


def timings(loaded: LoadedModel, prompts: list[list[int]], context: int, steps: int) -> dict:
    blocks = len(prompts) * sequence_blocks(loaded.config, BLOCK, context + steps + 2)
    step = engine_decode_step_s(loaded, CacheConfig(block_size=BLOCK, num_blocks=blocks), prompts, steps)
    return {"prefill_ms": bench_prefill(loaded, context, repeats=2).ms_per_step, "decode_step_ms": step * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.375, 0.5])
    parser.add_argument("--mode", choices=["fold", "rotate", "auto"], default="auto")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per layout (0: no timing)")
    parser.add_argument("--overhead-repeats", type=int, default=5, help="interleaved timings of the runs' cost")
    parser.add_argument("--plot", default="", help="write perplexity vs budget here (PNG)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = load_model(BUNDLED_MODEL)
    held = read_eval_tokens(base.tokenizer, BUNDLED_HELDOUT, max_tokens=max(args.tokens) + 1)
    prompts = [held[i * 16: i * 16 + args.context].tolist() for i in range(args.batch)]

    def score(model) -> dict:
        return {f"ppl_{n}": perplexity_full(model, held[: n + 1], ctx=1024, progress=False).perplexity
                for n in args.tokens}

    rows = [{"layout": "uncompressed", "budget": 1.0, "kv_fraction": 1.0, **score(base.model)}]
    if args.steps:
        rows[0].update(timings(base, prompts, args.context, args.steps))
    for granularity in ("layer", "head"):
        method = ZeroCMethod(mode=args.mode, granularity=granularity)
        meas = measure(base, BUNDLED_CALIB, method, progress=not args.json)
        for budget in tqdm(args.budgets, desc=f"{granularity}: layouts", disable=args.json):
            model, report = compress(base, meas, replace(method, budget=budget))
            loaded = LoadedModel(model, model.config, base.tokenizer, base.path)
            row = {"layout": f"per {granularity}", "budget": budget, "kv_fraction": report.kv_fraction,
                   "ranks": report.ranks, "modes": report.modes, "measured_kl": report.measured_kl,
                   "predicted_kl": report.predicted_kl, **score(model)}
            if args.steps:
                row.update(timings(loaded, prompts, args.context, args.steps))
            rows.append(row)
    overhead = runs_overhead(base, prompts, args.context, args.steps, args.overhead_repeats) if args.steps else {}
    if args.plot:
        plot(rows, args.tokens[-1], args.plot)
    if args.json:
        print(json.dumps({"rows": rows, "runs_overhead": overhead, "threads": torch.get_num_threads()}))
        return
    cols = [f"ppl_{n}" for n in args.tokens] + (["prefill_ms", "decode_step_ms"] if args.steps else [])
    print("layout        budget  KV     KL      " + "  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        kl = f"{r['measured_kl']:.4f}" if "measured_kl" in r else "-     "
        print(f"{r['layout']:<13} {r['budget']:<6} {r['kv_fraction']:.3f}  {kl}  "
              + "  ".join(f"{r[c]:>14.2f}" for c in cols) + ("" if "ranks" not in r else f"  {r['ranks']}"))
    for name, t in overhead.items():
        print(f"every layer {name}: prefill {t['prefill_ms']:.1f} ms, decode step {t['decode_step_ms']:.1f} ms (best of "
              f"{args.overhead_repeats})")


def runs_overhead(base: LoadedModel, prompts: list[list[int]], context: int, steps: int, repeats: int) -> dict:
    """Best-of-`repeats` timings, interleaved, of two layouts with the same bytes: every layer at uniform ranks,
    and every layer's two KV heads split (two runs per layer). Factors from 2048 calibration tokens."""
    from zeroc.compression.calibrate import collect_statistics, compute_factors
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression

    calib = read_eval_tokens(base.tokenizer, BUNDLED_CALIB, 2048)[:2048].view(4, 512)
    factors = compute_factors(base.model, collect_statistics(base.model, calib, progress=False))
    layouts = {"uniform (40, 8)": (40, 8), "split ((48, 32), 8)": ((48, 32), 8)}
    models = {}
    for name, (qk, v) in layouts.items():
        comp = AttentionCompression(tuple(f.layer_compression(qk, v, "rotate") for f in factors), "runs", 0.375)
        model = build_compressed(base.model, factors, comp)
        models[name] = LoadedModel(model, model.config, base.tokenizer, base.path)
    best = {name: {"prefill_ms": float("inf"), "decode_step_ms": float("inf")} for name in models}
    for _ in range(repeats):
        for name, loaded in models.items():
            for key, value in timings(loaded, prompts, context, steps).items():
                best[name][key] = min(best[name][key], value)
    return best


def plot(rows: list[dict], tokens: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layout, marker in (("per layer", "o"), ("per head", "s")):
        pts = sorted((r["kv_fraction"], r[f"ppl_{tokens}"]) for r in rows if r["layout"] == layout)
        ax.plot(*zip(*pts), marker=marker, label=f"ZeroC, ranks {layout}")
    ax.axhline(rows[0][f"ppl_{tokens}"], color="grey", linestyle="--", label="uncompressed")
    ax.set_xlabel("KV cache bytes / uncompressed")
    ax.set_ylabel(f"perplexity (held-out, first {tokens} tokens, ctx 1024)")
    ax.set_title("Bundled model: ranks per KV head vs per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
