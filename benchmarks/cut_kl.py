"""What a calibration cut costs to measure: the model built whole per cut, against the forward resumed at the cut.

    python benchmarks/cut_kl.py [--sensitivity-tokens 512] [--window 256] [--rank-multiple 16] [--threads 1]
                                [--ablation-tokens 256] [--limit N] [--json PATH]

On the bundled model, every cut of `zeroc calibrate`'s full-KL sensitivity (per KV head, both Q/K modes and V, each
candidate rank) measured both ways, alternating cut by cut in one run: `build_compressed` with the cut and every
other layer whole, then `divergence` (how calibrate.py measured a cut before), and `cut_kl` from the source's
hidden states entering the cut layer (zeroc/compression/divergence.py; those run once per layer, and count). Prints
the seconds per cut of each, their ratio, and the largest difference between the two KLs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from zeroc.compression.calibrate import (ZeroCMethod, _windows, collect_statistics, compute_factors, cut_compression,
                                         layer_cuts)
from zeroc.compression.divergence import cut_kl, divergence, layer_inputs, reference
from zeroc.compression.fold import build_compressed, cut_attention, whole_layer
from zeroc.config import BUNDLED_CALIB, BUNDLED_MODEL, AttentionCompression
from zeroc.data import read_eval_tokens
from zeroc.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensitivity-tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--rank-multiple", type=int, default=16)
    ap.add_argument("--ablation-tokens", type=int, default=256, help="0: RoPE pairs in index order (no ablation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="measure only the first N cuts")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(BUNDLED_MODEL)
    model, cfg = loaded.model, loaded.config
    method = ZeroCMethod(mode="auto", rank_multiple=args.rank_multiple, window=args.window)  # fold, rotate and V
    tokens = read_eval_tokens(loaded.tokenizer, BUNDLED_CALIB)
    stats = collect_statistics(model, _windows(tokens, args.window, 2048), progress=False,
                               sample_tokens=args.ablation_tokens)
    factors = compute_factors(model, stats)
    ref = reference(model, _windows(tokens, args.window, args.sensitivity_tokens))
    cuts = [(i, *cut) for i in range(cfg.num_hidden_layers) for cut in layer_cuts(cfg, method)][: args.limit]
    seconds, diff, inputs = {"whole": 0.0, "resumed": 0.0}, 0.0, {}
    for i, *cut in tqdm(cuts, desc="cuts", disable=args.json is not None):
        comp = cut_compression(cfg, factors[i], *cut)
        start = time.perf_counter()
        layers = [whole_layer(cfg)] * cfg.num_hidden_layers
        layers[i] = comp
        whole = divergence(build_compressed(model, factors, AttentionCompression(tuple(layers), "", 1.0)), ref)[0]
        mid = time.perf_counter()
        if i not in inputs:
            inputs = {i: layer_inputs(model, ref, i)}
        attn = cut_attention(model.model.layers[i].self_attn, cfg, i, factors[i], comp)
        resumed = cut_kl(model, ref, i, attn, inputs[i])
        seconds["whole"] += mid - start
        seconds["resumed"] += time.perf_counter() - mid
        diff = max(diff, abs(resumed - whole))
    row = {"cuts": len(cuts), "whole_s_per_cut": seconds["whole"] / len(cuts),
           "resumed_s_per_cut": seconds["resumed"] / len(cuts), "speedup": seconds["whole"] / seconds["resumed"],
           "max_abs_kl_diff": diff, "threads": args.threads, "sensitivity_tokens": ref.windows.numel()}
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=1))
    print(f"{row['cuts']} cuts, {row['sensitivity_tokens']} tokens, {args.threads} thread(s): whole model "
          f"{1e3 * row['whole_s_per_cut']:.0f} ms/cut, resumed {1e3 * row['resumed_s_per_cut']:.0f} ms/cut "
          f"({row['speedup']:.2f}x); largest |KL difference| {diff:.2e}")


if __name__ == "__main__":
    main()
