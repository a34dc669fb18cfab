"""StreamingLLM, SnapKV and Palu in the paged serving cache: each equal to its streaming evaluator,
their blocks and bytes by hand, KV from a prefill worker where the policy allows it."""

from __future__ import annotations

import pytest
import torch

from serving_runs import check_landed_is_colocated, check_serving_is_the_policy, policy_cache, serve
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.caches import paged_cache
from zeroc.kv_cache import LayerShape, block_bytes, layer_shapes
from zeroc.policies import make_policy
from zeroc.policies.palu import Palu
from zeroc.policies.snapkv import SnapKV
from zeroc.policies.streaming_llm import StreamingLLM
from zeroc.sampling import SamplingParams
from zeroc.transport.landing import check_transfer

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
CASES = [  # (policy name, evaluator, budget, model, prompt tokens, prefill splits)
    ("streamingllm", StreamingLLM, 0.5, "bundled", 40, [[15, 1, 24]]),
    ("snapkv", SnapKV, 0.5, "bundled", 45, [[30, 15]]),  # the 32-query window wraps its ring
    ("snapkv", SnapKV, 0.3, "random_gqa", 40, [[40]]),  # 4 query heads per KV head
    ("palu", Palu, 0.5, "bundled", 40, [[40], [15, 1, 24]]),
    ("palu", Palu, 0.25, "random_gqa", 40, [[17, 23]]),  # llama3 RoPE scaling
]


@pytest.mark.parametrize("name,rule,budget,model_name,prompt,chunks", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_serving_equals_the_streaming_evaluator(request, heldout_ids, name, rule, budget, model_name, prompt,
                                                chunks):
    check_serving_is_the_policy(request.getfixturevalue(model_name), rule(budget=budget), heldout_ids[:prompt], 6,
                                chunks, block_size=16, num_blocks=32, kv_policy=name, kv_budget=budget)


# The bundled model's cache geometry: 6 layers of 2 KV heads, K and V 64 wide (6 query heads).
BUNDLED = [LayerShape(2, 64, 64)] * 6


def test_block_bytes_by_hand():
    f32 = torch.float32
    plain = 16 * 6 * 2 * (64 + 64) * 4  # 16 tokens x layers x heads x (K + V) widths x fp32
    assert block_bytes(BUNDLED, 16, f32) == plain
    # Palu at 0.5: latents of rank 32 for K and for V; at 0.25: rank 16.
    assert Palu(0.5).block_bytes(BUNDLED, 16, f32) == 16 * 6 * 2 * (32 + 32) * 4 == plain // 2
    assert Palu(0.25).block_bytes(BUNDLED, 16, torch.bfloat16) == 16 * 6 * 2 * (16 + 16) * 2
    # Eviction: K and V per slot plus an int32 position and a float64 score per (slot, head).
    for policy in (StreamingLLM(0.5), SnapKV(0.5)):
        assert policy.block_bytes(BUNDLED, 16, f32) == plain + 16 * 6 * 2 * (4 + 8)


def kept_positions(cache, seq: str) -> list[list[int]]:
    """[layer * kv head] -> sorted positions a sequence keeps (read from its blocks)."""
    store, n = cache.pools, cache.policy.slots_for(cache.seq_len(seq))
    slots = store._slots(cache.block_table(seq), n)
    return [sorted(pos.view(-1, pos.shape[-1])[slots, h].tolist()) for pos in store.pos for h in range(pos.shape[-1])]


def test_streamingllm_keeps_sinks_and_the_latest_tokens(bundled, heldout_ids):
    cache = policy_cache(bundled, block_size=4, num_blocks=16, kv_policy="streamingllm", kv_budget=0.5)
    with torch.inference_mode():
        for start, n in ((0, 15), (15, 5)):
            batch = cache.schedule([("s", n)])
            bundled.model.forward_paged(torch.tensor(heldout_ids[start:start + n]), batch.positions, batch, cache)
    # t = 20 at b = 0.5: 10 tokens, the 4 sinks and the 6 latest, in ceil(10 / 4) = 3 blocks.
    assert kept_positions(cache, "s") == [[0, 1, 2, 3, 14, 15, 16, 17, 18, 19]] * 12
    assert cache.num_blocks - cache.num_free_blocks == 3


def test_snapkv_borrows_a_query_ring_and_keeps_its_window(bundled, heldout_ids):
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=64, kv_policy="snapkv", kv_budget=0.8))
    cache = engine.cache
    # 60 tokens at b = 0.8: 48 kept = 3 blocks, plus the ring: 32 queries x 3 query heads per KV head
    # = 96 rows of 16 = 6 blocks.
    assert cache.blocks_needed("new", 60) == 3 + 6
    engine.add_request(heldout_ids[:60], SamplingParams(max_new_tokens=3, ignore_eos=True), "r")
    engine.step()  # prefill, and the first token
    assert cache.num_blocks - cache.num_free_blocks == 9
    kept = kept_positions(cache, "r")
    for per_head in kept:
        assert len(set(per_head)) == 48 and per_head[-32:] == list(range(28, 60))  # the window is protected
    assert any(per_head != list(range(12, 60)) for per_head in kept)  # the other 16: votes, not recency
    while engine.has_unfinished():
        engine.step()
    assert cache.num_free_blocks == cache.num_blocks and not cache.pools.rings


def test_palu_at_full_rank_is_plain_attention(random_gqa, heldout_ids):
    ids = heldout_ids[:30]
    plain, want = serve(random_gqa.model, policy_cache(random_gqa, block_size=16, num_blocks=8), ids, 4, [30])
    cache = policy_cache(random_gqa, block_size=16, num_blocks=8, kv_policy="palu", kv_budget=1.0)
    logits, tokens = serve(random_gqa.model, cache, ids, 4, [30])
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)  # rotate back, project, rebuild: exact
    assert tokens == want


@pytest.mark.parametrize("name,model_name", [("streamingllm", "bundled"), ("palu", "random_gqa")])
def test_kv_from_a_prefill_worker_lands_and_decodes_like_colocated(request, heldout_ids, name, model_name):
    loaded = request.getfixturevalue(model_name)
    cfg = CacheConfig(block_size=16, num_blocks=32, kv_policy=name, kv_budget=0.5)
    ids = heldout_ids[:36]
    check_landed_is_colocated(loaded, cfg, ids)


def test_snapkv_and_h2o_stay_colocated():
    for name in ("snapkv", "h2o"):
        policy = make_policy(CacheConfig(kv_policy=name, kv_budget=0.5))
        assert not policy.transferable
        with pytest.raises(ValueError, match="--colocated"):
            check_transfer(CacheConfig(kv_policy=name))
        with pytest.raises(NotImplementedError):
            policy.new_pools(BUNDLED, 4, 16, torch.float32, torch.device("cpu"), None).load(
                0, [0], torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))
    for name in ("streamingllm", "palu"):
        check_transfer(CacheConfig(kv_policy=name))  # no error


@pytest.mark.parametrize("build,message", [
    (lambda: StreamingLLM(budget=0.0), "budget must be in (0, 1]"),
    (lambda: StreamingLLM(sinks=0), "at least 1 sink"),
    (lambda: SnapKV(window=0), "window must be a positive int"),
    (lambda: SnapKV(kernel=4), "positive odd int"),
    (lambda: SnapKV(budget=1.5), "budget must be in (0, 1]"),
    (lambda: Palu(budget=-0.1), "budget must be in (0, 1]"),
    (lambda: make_policy(CacheConfig(kv_policy="palu", kv_max_tokens=8)), "h2o only, not palu"),
    (lambda: make_policy(CacheConfig(kv_policy="streamingllm", kv_residual=32)), "kivi-4 and kivi-2 only"),
])
def test_bad_hyperparameters_are_value_errors(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        build()


def test_palu_fits_its_bases_with_the_model_and_refuses_without(bundled):
    cache = policy_cache(bundled, block_size=16, num_blocks=4, kv_policy="palu", kv_budget=0.5)
    assert len(cache.pools.bases) == 6 and cache.pools.bases[0][0].shape == (2, 64, 32)  # [kv, dk, r]
    unbound = paged_cache(layer_shapes(bundled.config), CacheConfig(block_size=16, num_blocks=4, kv_policy="palu"),
                           torch.float32)
    with pytest.raises(RuntimeError, match="model="):
        serve(bundled.model, unbound, [5, 6], 1, [2])
