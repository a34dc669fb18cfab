"""Sequence-parallel prefill on 2 and 4 gloo processes equals single-rank prefill."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import AttentionCompression
from zeroc.loader import load_model
from zeroc.parallel.sequence_parallel import CommStats, shard_bounds, sp_prefill, split_heads


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
            model = _uniform_compressed(model, rank_override)
        stats = CommStats()
        logits = sp_prefill(model, tokens, rank, world, stats)
        results[rank] = (logits, stats.bytes_sent)
    finally:
        dist.destroy_process_group()


def _uniform_compressed(model, rank):
    """Every layer folded to the same rank (factors from random tokens: deterministic per model)."""
    calib = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    factors = compute_factors(model, collect_statistics(model, calib, progress=False))
    layout = AttentionCompression(tuple(f.layer_compression(rank, rank) for f in factors), "uniform", 0.5)
    return build_compressed(model, factors, layout)


def _run(world, model_dir, tokens, rank_override=0):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), model_dir, rank_override, tokens, results), nprocs=world)
    return [results[r] for r in range(world)]


def test_head_split_covers_every_head_once():
    splits = split_heads(6, 2, 4)  # 6 query heads over 4 ranks: 2, 2, 1, 1
    assert [s.q_heads for s in splits] == [[0, 1], [2, 3], [4], [5]]
    assert [s.kv_heads for s in splits] == [[0], [0, 1], [1], [1]]
    with pytest.raises(ValueError):
        split_heads(2, 1, 3)
    assert shard_bounds(10, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize("world", [2, 4])
def test_sp_prefill_equals_single_rank(random_gqa, random_gqa_dir, world):
    tokens = torch.randint(0, random_gqa.config.vocab_size, (150,), generator=torch.Generator().manual_seed(world))
    with torch.no_grad():
        ref = random_gqa.model(tokens[None])[0]
    results = _run(world, random_gqa_dir, tokens)
    got = torch.cat([logits for logits, _ in results])
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_compressed_qkv_ship_fewer_bytes_in_proportion_to_the_rank(random_gqa_dir):
    """All-to-all bytes with every Q/K/V at rank 16 of 32 are exactly half the uncompressed bytes."""
    tokens = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(7))
    full = _run(2, random_gqa_dir, tokens)
    half = _run(2, random_gqa_dir, tokens, rank_override=16)
    for (_, b_full), (_, b_half) in zip(full, half):
        assert len(b_full) == len(b_half) == 2 * 3  # two all-to-alls per layer, 3 layers
        assert sum(b_half) * 2 == sum(b_full)
    with torch.no_grad():
        ref = _uniform_compressed(load_model(random_gqa_dir).model, 16)(tokens[None])[0]
    assert (torch.cat([logits for logits, _ in half]) - ref).abs().max().item() < 1e-4


def test_sp_prefill_of_a_model_with_per_head_ranks_equals_single_rank(zeroc_heads_dir):
    """Layers with per-KV-head ranks hand the all-to-all one KV row of every head's dims (each rank gets it
    whole); the others split KV heads as usual."""
    loaded = load_model(zeroc_heads_dir)
    tokens = torch.randint(0, loaded.config.vocab_size, (90,), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = loaded.model(tokens[None])[0]
    got = torch.cat([logits for logits, _ in _run(2, zeroc_heads_dir, tokens)])
    assert (got - ref).abs().max().item() < 1e-4
