"""KV policies in the serving cache: blocks per GiB, sequences per GiB, and decode step time.

    python benchmarks/serving_policies.py [--context 512] [--batch 4] [--steps 8] [--json]

Capacity is arithmetic on the real pool layouts (no GiB is allocated): for the bundled model at
fp32 and bf16, the bytes one block id costs per policy, how many fit in 1 GiB, and how many
sequences of `--context` tokens that is, each about to grow (KIVI's filling block at full
precision; H2O, StreamingLLM, SnapKV and Palu at budget 0.5, SnapKV's query ring included).
Time (`--steps 0` skips it): one engine running `--batch` sequences of `--context` prompt tokens, mean
seconds per decode step over `--steps` steps, for every policy side by side in one run (the CPU
reference path; the ratio to "none" is the figure to read).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm


from zeroc.config import BUNDLED_HELDOUT, BUNDLED_MODEL, CacheConfig
from zeroc.bench.forward import engine_decode_step_s
from zeroc.data import read_eval_tokens
from zeroc.caches import paged_cache
from zeroc.kv_cache import block_bytes, layer_shapes
from zeroc.loader import load_model

GIB = 1 << 30
POLICIES = {"none": {"block_size": 32}, "kivi-4": {"block_size": 32, "kv_policy": "kivi-4"},
            "kivi-2": {"block_size": 32, "kv_policy": "kivi-2"},
            "h2o@0.5": {"block_size": 32, "kv_policy": "h2o", "kv_budget": 0.5},
            "streamingllm@0.5": {"block_size": 32, "kv_policy": "streamingllm", "kv_budget": 0.5},
            "snapkv@0.5": {"block_size": 32, "kv_policy": "snapkv", "kv_budget": 0.5},
            "palu@0.5": {"block_size": 32, "kv_policy": "palu", "kv_budget": 0.5},
            "int8": {"block_size": 32, "kv_policy": "int8"}}


def capacity(loaded, dtype: torch.dtype, context: int) -> list[dict]:
    shapes, rows = layer_shapes(loaded.config), []
    for name, settings in POLICIES.items():
        # One block: geometry only (the model: SnapKV's query ring depends on its head counts).
        probe = paged_cache(shapes, CacheConfig(num_blocks=1, **settings), dtype, model=loaded.model)
        per_block = probe.policy.block_bytes(shapes, 32, dtype) if probe.policy else block_bytes(shapes, 32, dtype)
        blocks = GIB // per_block
        per_seq = probe.blocks_needed("probe", context + 1)  # growing: KIVI's filling block at full precision
        rows.append({"policy": name, "dtype": str(dtype).removeprefix("torch."), "block_bytes": per_block,
                     "blocks_per_gib": blocks, "tokens_per_gib": blocks * 32,
                     "blocks_per_sequence": per_seq, "sequences_per_gib": blocks // per_seq})
    return rows


def decode_time(loaded, context: int, batch: int, steps: int) -> list[dict]:
    ids = read_eval_tokens(loaded.tokenizer, BUNDLED_HELDOUT, max_tokens=context + batch * 16).tolist()
    prompts = [ids[i * 16: i * 16 + context] for i in range(batch)]
    rows = []
    for name, settings in tqdm(POLICIES.items(), desc="decode steps", unit="policy"):
        cache = CacheConfig(num_blocks=batch * (context // 32 + 8), **settings)
        rows.append({"policy": name, "s_per_decode_step": engine_decode_step_s(loaded, cache, prompts, steps)})
    base = rows[0]["s_per_decode_step"]
    for r in rows:
        r["vs_none"] = r["s_per_decode_step"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per policy (0: capacity only)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    loaded = load_model(BUNDLED_MODEL)
    report = {"capacity": capacity(loaded, torch.float32, args.context) + capacity(loaded, torch.bfloat16,
                                                                                   args.context),
              "decode": decode_time(loaded, args.context, args.batch, args.steps) if args.steps else [],
              "threads": torch.get_num_threads(), "context": args.context, "batch": args.batch}
    if args.json:
        print(json.dumps(report))
        return
    print(f"capacity (bundled model, sequences of {args.context} tokens):")
    for r in report["capacity"]:
        print(f"  {r['policy']:<16} {r['dtype']:<9} {r['block_bytes']:>7} B/block {r['blocks_per_gib']:>7} blocks/GiB "
              f"{r['tokens_per_gib']:>9} tokens/GiB {r['sequences_per_gib']:>6} sequences/GiB")
    print(f"decode step, batch {args.batch} x {args.context} tokens (CPU reference path):")
    for r in report["decode"]:
        print(f"  {r['policy']:<16} {r['s_per_decode_step'] * 1000:>8.1f} ms  x{r['vs_none']:.2f}")


if __name__ == "__main__":
    main()
