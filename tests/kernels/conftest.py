"""Shared builders for the kernel tests."""

from __future__ import annotations

import math

import pytest
import torch


def _random_paged_kv(gen, lens, block_size, kv_heads, dq, dv, dtype):
    """A random K/V cache whose sequences (of `lens` tokens) own scattered blocks.

    -> k_cache [blocks, block_size, kv_heads, dq], v_cache [..., dv], block_tables [B, max_blocks]
    """
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2  # two blocks nobody owns
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dq, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dv, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    width = max(need)
    return k_cache, v_cache, torch.tensor([t + [0] * (width - len(t)) for t in tables])


@pytest.fixture(scope="session")
def random_paged_kv():
    return _random_paged_kv


def _int8_pools(k_cache, v_cache):
    """Every slot of both caches quantised by the cache-write kernel's reference.

    -> k int8 [blocks, block_size, kv_heads, dq], k scales [blocks, block_size, kv_heads], v, v scales"""
    from zeroc_kernels.kv_quant import quantize_into_slots_ref

    pools = []
    for cache in (k_cache, v_cache):
        qpool = torch.zeros(cache.shape, dtype=torch.int8)
        spool = torch.zeros(cache.shape[:3])
        quantize_into_slots_ref(cache.flatten(0, 1), torch.arange(cache.shape[0] * cache.shape[1]), qpool, spool)
        pools += [qpool, spool]
    return tuple(pools)


@pytest.fixture(scope="session")
def int8_pools():
    return _int8_pools


def _head_major(scales):
    """Scales [blocks, block_size, kv_heads] stored [blocks, kv_heads, block_size], as the serving int8 pools keep
    them (zeroc/policies/int8.py), seen through a view of the logical shape."""
    return scales.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.fixture(scope="session")
def head_major():
    return _head_major


def _poison_unused_slots(pool, block_tables, seq_lens):
    """`pool` ([blocks, block_size, ...], float) with NaN in every slot outside the sequences' contexts:
    unowned blocks and the tail of each last block. A kernel that reads past a context shows it."""
    block_size = pool.shape[1]
    used = torch.zeros(pool.shape[:2], dtype=torch.bool)
    for table, n in zip(block_tables.tolist(), seq_lens.tolist()):
        for i in range(n):
            used[table[i // block_size], i % block_size] = True
    shape = used.shape + (1,) * (pool.dim() - 2)
    return torch.where(used.view(shape), pool, torch.full_like(pool, float("nan")))


@pytest.fixture(scope="session")
def poison_unused_slots():
    return _poison_unused_slots


def _tier_decode_case(seed: int, b: int = 3, kv: int = 2, group: int = 3, dims=(12, 8, 20, 24), held: int = 6,
                      parts: int = 2, dtype=torch.float32, own_seen: bool = True):
    """A token tier's decode step (kernels/tier_decode.py) in a pool whose every element is NaN but the rows the
    queries see, blocks of 4 tokens (tier rows span several borrowed blocks) -> (`tier_decode`'s arguments,
    (tier row width, elements per block))."""
    from zeroc_kernels.tier_decode import TierSlots

    bs = 4
    k_dim, v_dim, tier_k, tier_v = dims
    gen = torch.Generator().manual_seed(seed)
    width, row = tier_k + tier_v, k_dim + v_dim
    per_block = bs * kv * row
    n_tier = -(-held * kv * width // per_block)
    num_blocks = b * (held + n_tier) + 1
    pool = torch.full((num_blocks, bs, kv, row), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tier_ids = perm[: b * n_tier].view(b, n_tier)
    free = perm[b * n_tier:]
    blocks = free[torch.randint(len(free), (b, held), generator=gen)]
    offsets = torch.randint(bs, (b, held), generator=gen)
    seen = torch.rand(b, held + 1, generator=gen) < 0.7
    seen[:, -1] = own_seen
    seen[0, :-1] = False  # a sequence whose only full-rank key is its own row (or none)
    flat = pool.view(num_blocks, -1)
    for i in range(b):  # write the seen rows (a block may hold several slots' rows: distinct offsets suffice)
        for j in range(held):
            if seen[i, j]:
                pool[blocks[i, j], offsets[i, j]] = torch.randn(kv, row, generator=gen).to(dtype)
                at = j * kv * width + torch.arange(kv * width)
                flat[tier_ids[i, at // per_block], at % per_block] = torch.randn(kv * width, generator=gen).to(dtype)
    heads, q_dim = kv * group, k_dim + tier_k
    q = torch.randn(b, heads, q_dim, generator=gen).to(dtype)
    k_own = torch.randn(b, kv, q_dim, generator=gen).to(dtype)
    v_own = torch.randn(b, kv, v_dim + tier_v, generator=gen).to(dtype)
    p = torch.randn(b, heads, parts, v_dim, generator=gen)
    lses = torch.randn(b, heads, parts, generator=gen) * 3
    lses[1, :, 0] = float("-inf")  # a split that held no key
    slots = TierSlots(blocks, offsets, tier_ids, seen)
    return (q, pool, k_dim, slots, k_own, v_own, p, lses, 1 / math.sqrt(q_dim)), (width, per_block)


@pytest.fixture(scope="session")
def tier_decode_case():
    return _tier_decode_case
