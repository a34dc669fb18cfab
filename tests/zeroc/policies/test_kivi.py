"""KIVI in the paged serving cache: equal to the streaming evaluator, packed bytes, borrowed tail blocks."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from serving_runs import BUNDLED, GREEDY, check_landed_is_colocated, check_serving_is_the_policy, policy_cache
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.caches import paged_cache
from zeroc.kv_cache import block_bytes, layer_shapes
from zeroc.kv_transfer import KvTransferError
from zeroc.policies.kivi import KIVI
from zeroc.transport.landing import receive_into



@pytest.mark.parametrize("model_name,bits,residual,prompt,chunks", [
    ("bundled", 4, 0, 70, [[70], [33, 1, 36]]),  # blocks quantised inside the prompt and while decoding
    ("random_gqa", 2, 32, 100, [[100], [64, 36]]),  # a full-precision residual block besides the filling one
])
def test_serving_equals_the_streaming_evaluator(request, heldout_ids, model_name, bits, residual, prompt, chunks):
    check_serving_is_the_policy(request.getfixturevalue(model_name), KIVI(bits=bits, residual=residual),
                                heldout_ids[:prompt], 10, chunks, block_size=32, num_blocks=64,
                                kv_policy=f"kivi-{bits}", kv_residual=residual)


# The bundled model's cache geometry: 6 layers of 2 KV heads, K and V 64 wide.


@pytest.mark.parametrize("dtype,item", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_block_bytes_and_blocks_per_budget_by_hand(dtype, item):
    plain = 32 * 6 * 2 * (64 + 64) * item  # 32 tokens x layers x heads x (K + V) widths
    assert block_bytes(BUNDLED, 32, dtype) == plain
    # Per layer: codes of 32 tokens x 2 heads x 64 channels for K and V at `bits` bits; keys: a scale and a
    # zero per (head, channel); values: a scale and a zero per (token, head, group of 32 channels).
    for bits in (4, 2):
        codes = 2 * 32 * 2 * 64 * bits // 8
        meta = 2 * (2 * 64) * item + 2 * (32 * 2 * 2) * item
        assert KIVI(bits=bits).block_bytes(BUNDLED, 32, dtype) == 6 * (codes + meta)
    budget = 3 << 20
    for name, per_block in (("none", plain), ("kivi-4", KIVI(4).block_bytes(BUNDLED, 32, dtype))):
        cache = paged_cache(BUNDLED, CacheConfig(block_size=32, num_bytes=budget, kv_policy=name), dtype)
        assert cache.num_blocks == budget // per_block
        held = (sum(a.numel() for a in cache.pools.arenas) if cache.pools
                else sum(p.numel() * p.element_size() for p in cache.k_pools + cache.v_pools))
        assert held == cache.num_blocks * per_block <= budget  # the pools really are that size
    # fp32: 196608 / 36864 = 5.33x the blocks for 4-bit; bf16: 98304 / 30720 = 3.2x.
    assert KIVI(4).block_bytes(BUNDLED, 32, dtype) == {4: 36864, 2: 30720}[item]


def test_the_filling_block_borrows_rows_and_returns_them(random_gqa, heldout_ids):
    """A full-precision block spans `units` ids; the engine's arithmetic (blocks_needed) is exact."""
    cache = policy_cache(random_gqa, block_size=32, num_blocks=40, kv_policy="kivi-4")
    store = cache.pools
    # 32 tokens x 2 heads x (32 + 32) fp32 = 16384 bytes at full precision; 3072 packed -> 6 rows.
    assert store.units == math.ceil(16384 / 3072) == 6

    def held(t: int) -> int:
        return math.ceil(t / 32) + (store.units - 1) * (1 if t % 32 else 0)  # residual 0: the filling block

    t, ids = 0, heldout_ids
    with torch.inference_mode():
        for n in (40, 1, 1, 22, 1, 30, 1, 2):  # crosses block boundaries in prefill and decode steps
            need = cache.blocks_needed("s", n)
            before = cache.num_free_blocks
            batch = cache.schedule([("s", n)])
            assert before - cache.num_free_blocks == need
            random_gqa.model.forward_paged(torch.tensor(ids[t:t + n]), batch.positions, batch, cache)
            t += n
            assert cache.num_blocks - cache.num_free_blocks == held(t)
    cache.free("s")
    assert cache.num_free_blocks == cache.num_blocks and not store.borrowed


def test_the_same_bytes_run_more_sequences_at_once_and_preemption_keeps_output(random_gqa, heldout_ids):
    prompts = [heldout_ids[i * 2: i * 2 + 150] for i in range(6)]
    plain_block = block_bytes(layer_shapes(random_gqa.config), 32, torch.float32)  # 49152 bytes
    running = {}
    for name in ("none", "kivi-4"):
        engine = Engine(random_gqa, CacheConfig(block_size=32, num_bytes=10 * plain_block, kv_policy=name))
        for p in prompts:
            engine.add_request(p, GREEDY)
        engine.step()
        running[name] = len(engine.running)
    # 150 tokens: 5 plain blocks, so 2 prompts fit; packed, 4 blocks + a filling one spanning 6 rows of
    # 9216 bytes = 10 ids, and 491520 // 9216 = 53 ids hold 5 prompts.
    assert running == {"none": 2, "kivi-4": 5}
    prompts = [heldout_ids[i * 7: i * 7 + n] for i, n in enumerate((60, 50, 40, 30))]
    want = Engine(random_gqa, CacheConfig(block_size=32, num_blocks=256, kv_policy="kivi-4")).generate(prompts, GREEDY)
    tight = Engine(random_gqa, CacheConfig(block_size=32, num_blocks=14, kv_policy="kivi-4"))
    rids = [tight.add_request(p, GREEDY) for p in prompts]
    got, ran, preempted = {r: [] for r in rids}, set(), False
    while tight.has_unfinished():
        for o in tight.step():
            got[o.request_id] += o.token_ids
        preempted |= any(s.request_id in ran for s in tight.waiting)
        ran |= {s.request_id for s in tight.running}
    assert preempted  # growing tails outran the cache: the newest sequence was recomputed
    assert [got[r] for r in rids] == [r.token_ids for r in want]
    assert tight.cache.num_free_blocks == tight.cache.num_blocks and not tight.cache.pools.borrowed


def test_kv_from_a_kivi_prefill_lands_encoded_and_decodes_like_colocated(bundled, heldout_ids):
    cfg = CacheConfig(block_size=32, num_blocks=64, kv_policy="kivi-4")
    ids = heldout_ids[:75]
    # 74 tokens: 2 packed blocks, the third fills at full precision over 6 rows.
    check_landed_is_colocated(bundled, cfg, ids, held_blocks=2 + 6)


def test_kv_landing_after_the_request_was_released_is_cancelled(random_gqa):
    engine = Engine(random_gqa, CacheConfig(block_size=32, num_blocks=32, kv_policy="kivi-4"))
    _, land = receive_into(engine.cache, "r", engine.reserve("r", 40))
    engine.abort("r")  # the client went away mid-transfer
    with pytest.raises(KvTransferError) as err:
        land()
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert engine.cache.num_free_blocks == 32 and not engine.cache.pools.borrowed
