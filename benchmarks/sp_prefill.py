"""Sequence-parallel prefill on the CPU (gloo): all-to-all bytes and time per layer.

    python benchmarks/sp_prefill.py [--tokens 1024] [--json]

Runs the bundled model's prefill on P = 2 and 4 processes, uncompressed and with every layer's
Q/K/V folded to ZeroC ranks 32 and 16 of 64 (budgets 0.5 and 0.25), and prints per-layer
all-to-all bytes (both directions, summed over ranks) and mean time per all-to-all.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import BUNDLED_CALIB, BUNDLED_MODEL, AttentionCompression
from zeroc.data import read_eval_tokens
from zeroc.loader import load_model
from zeroc.parallel.sequence_parallel import CommStats, sp_prefill


def _model(rank_dims: int):
    loaded = load_model(BUNDLED_MODEL)
    if rank_dims == loaded.config.head_dim:
        return loaded.model
    calib = read_eval_tokens(loaded.tokenizer, BUNDLED_CALIB, 4096)[:4096].view(8, 512)
    factors = compute_factors(loaded.model, collect_statistics(loaded.model, calib, progress=False))
    layout = AttentionCompression(tuple(f.layer_compression(rank_dims, rank_dims) for f in factors), "bench",
                                  rank_dims / loaded.config.head_dim)
    return build_compressed(loaded.model, factors, layout)


def _worker(rank, world, port, rank_dims, tokens, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(rank_dims)
        sp_prefill(model, tokens, rank, world)  # warm-up
        stats = CommStats()
        sp_prefill(model, tokens, rank, world, stats)
        results[rank] = (stats.bytes_sent, stats.seconds)
    finally:
        dist.destroy_process_group()


def measure(world: int, rank_dims: int, tokens: torch.Tensor) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, port, rank_dims, tokens, results), nprocs=world)
    layers = load_model(BUNDLED_MODEL).config.num_hidden_layers
    total_bytes = sum(sum(results[r][0]) for r in range(world))
    seconds = [t for r in range(world) for t in results[r][1]]
    return {"P": world, "rank": rank_dims, "bytes_per_layer": total_bytes / layers,
            "ms_per_all_to_all": 1e3 * sum(seconds) / len(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    loaded = load_model(BUNDLED_MODEL)
    tokens = read_eval_tokens(loaded.tokenizer, BUNDLED_CALIB, args.tokens)
    rows = [measure(world, r, tokens) for world in (2, 4) for r in (64, 32, 16)]
    for row in rows:
        base = next(b for b in rows if b["P"] == row["P"] and b["rank"] == 64)
        row["byte_ratio"] = row["bytes_per_layer"] / base["bytes_per_layer"]
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| P | rank | all-to-all bytes per layer | byte ratio | ms per all-to-all |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['P']} | {r['rank']} | {r['bytes_per_layer']:,.0f} | {r['byte_ratio']:.3f} | "
              f"{r['ms_per_all_to_all']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
