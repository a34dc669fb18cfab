"""Sequence-parallel prefill on 2 and 4 gloo processes equals single-rank prefill."""

from __future__ import annotations

import pytest
import torch

from sp_runs import run_sp as _run
from sp_runs import uniform_compressed
from zeroc.loader import load_model
from zeroc.parallel.sequence_parallel import shard_bounds, split_heads


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
        ref = uniform_compressed(load_model(random_gqa_dir).model, 16)(tokens[None])[0]
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
