"""Sequence-parallel prefill on real gloo process groups, for the tests. The worker lives here, in an importable
module, because spawned processes unpickle it by name (test modules are not importable in importlib mode)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import AttentionCompression
from zeroc.loader import load_model
from zeroc.parallel.sequence_parallel import CommStats, sp_prefill


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, model_dir, rank_override, tokens, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model(model_dir).model
        if rank_override:
            model = uniform_compressed(model, rank_override)
        stats = CommStats()
        logits = sp_prefill(model, tokens, rank, world, stats)
        results[rank] = (logits, stats.bytes_sent)
    finally:
        dist.destroy_process_group()


def uniform_compressed(model, rank):
    """Every layer folded to the same rank (factors from random tokens: deterministic per model)."""
    calib = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    factors = compute_factors(model, collect_statistics(model, calib, progress=False))
    layout = AttentionCompression(tuple(f.layer_compression(rank, rank) for f in factors), "uniform", 0.5)
    return build_compressed(model, factors, layout)


def run_sp(world, model_dir, tokens, rank_override=0):
    """Prefill `tokens` on `world` ranks -> per rank (logits, bytes sent)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), model_dir, rank_override, tokens, results), nprocs=world)
    return [results[r] for r in range(world)]
