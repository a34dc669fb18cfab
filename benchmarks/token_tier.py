"""The token tier in serving: what its rows cost in cache capacity and decode time, side by side.

    python benchmarks/token_tier.py [--context 1024] [--batch 4] [--steps 8] [--sinks 4] [--recent 64]
                                    [--model DIR ...] [--json]

Rows: the bundled model uncompressed; ZeroC at Q/K and V rank d/4 (fold, budget 0.25; factors fitted on
2048 tokens of the bundled calibration text); the same with a token tier of `--sinks` + `--recent`; and
any `--model` directory (e.g. `zeroc calibrate --budget 0.25 --sinks 4 --recent 64` output). Capacity is
arithmetic on the real cache (no GiB allocated): blocks one sequence of `--context` tokens holds, its
borrowed tier blocks included, and sequences per GiB at fp32. Time: one engine per row running
`--batch` sequences of `--context` prompt tokens, mean seconds per decode step over `--steps` steps
(the CPU path; the ratio to uncompressed is the figure to read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm


from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import BUNDLED_CALIB, BUNDLED_HELDOUT, BUNDLED_MODEL, AttentionCompression, CacheConfig
from zeroc.bench.forward import engine_decode_step_s
from zeroc.data import read_eval_tokens
from zeroc.caches import paged_cache, sequence_blocks
from zeroc.kv_cache import block_bytes, layer_shapes
from zeroc.loader import LoadedModel, load_model

GIB = 1 << 30
BLOCK = 16


def variants(base: LoadedModel, sinks: int, recent: int, dirs: list[str]) -> dict[str, LoadedModel]:
    """name -> model: uncompressed, ZeroC at rank d/4, the same with the tier, then each `dirs` model."""
    calib = read_eval_tokens(base.tokenizer, BUNDLED_CALIB, 2048)[:2048].view(4, 512)
    factors = compute_factors(base.model, collect_statistics(base.model, calib, progress=False))
    r = base.config.head_dim // 4
    out = {"uncompressed": base}
    for name, (s, w) in {"zeroc@0.25": (0, 0), f"zeroc@0.25+tier({sinks},{recent})": (sinks, recent)}.items():
        layout = AttentionCompression(tuple(f.layer_compression(r, r) for f in factors), "bench-tier", 0.25,
                                      sinks=s, recent=w)
        model = build_compressed(base.model, factors, layout)
        out[name] = LoadedModel(model, model.config, base.tokenizer, base.path)
    for d in dirs:
        out[Path(d).name] = load_model(d)
    return out


def capacity(loaded: LoadedModel, context: int) -> dict:
    shapes = layer_shapes(loaded.config)
    per_block = block_bytes(shapes, BLOCK, torch.float32)  # the tier's rows come out of the same blocks
    probe = paged_cache(shapes, CacheConfig(block_size=BLOCK, num_blocks=1), torch.float32, model=loaded.model)
    per_seq = probe.blocks_needed("probe", context + 1)
    return {"block_bytes": per_block, "blocks_per_sequence": per_seq, "bytes_per_sequence": per_seq * per_block,
            "sequences_per_gib": GIB // per_block // per_seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per row (0: capacity only)")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--model", action="append", default=[], help="another model directory to compare")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = load_model(BUNDLED_MODEL)
    ids = read_eval_tokens(base.tokenizer, BUNDLED_HELDOUT, max_tokens=args.context + args.batch * 16).tolist()
    prompts = [ids[i * 16: i * 16 + args.context] for i in range(args.batch)]
    rows = []
    with torch.inference_mode():
        for name, loaded in tqdm(variants(base, args.sinks, args.recent, args.model).items(), desc="rows"):
            row = {"model": name, **capacity(loaded, args.context)}
            if args.steps:
                blocks = args.batch * sequence_blocks(loaded.config, BLOCK, args.context + args.steps + 2)
                row["s_per_decode_step"] = engine_decode_step_s(loaded, CacheConfig(block_size=BLOCK, num_blocks=blocks),
                                                                 prompts, args.steps)
            rows.append(row)
    for r in rows:
        r["bytes_vs_uncompressed"] = r["bytes_per_sequence"] / rows[0]["bytes_per_sequence"]
        if args.steps:
            r["step_vs_uncompressed"] = r["s_per_decode_step"] / rows[0]["s_per_decode_step"]
    report = {"rows": rows, "context": args.context, "batch": args.batch, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(report))
        return
    print(f"bundled model, sequences of {args.context} tokens, fp32, batch {args.batch}:")
    for r in rows:
        step = (f"{r['s_per_decode_step'] * 1000:8.1f} ms/step x{r['step_vs_uncompressed']:.2f}" if args.steps else "")
        print(f"  {r['model']:<28} {r['bytes_per_sequence'] / 2**20:7.2f} MiB/seq x{r['bytes_vs_uncompressed']:.3f} "
              f"{r['sequences_per_gib']:>6} seq/GiB  {step}")


if __name__ == "__main__":
    main()
