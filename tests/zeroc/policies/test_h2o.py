"""H2O in the paged serving cache: equal to the streaming evaluator, and exactly its token budget in blocks."""

from __future__ import annotations

import math

import pytest
import torch

from serving_runs import check_serving_is_the_policy, policy_cache
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.policies.h2o import H2O
from zeroc.sampling import SamplingParams


@pytest.mark.parametrize("model_name,budget,max_tokens,prompt,chunks", [
    ("bundled", 0.5, 0, 60, [[60], [25, 1, 34]]),
    ("random_gqa", 1.0, 24, 50, [[50], [10, 40]]),  # a fixed budget of 24 tokens per sequence
])
def test_serving_equals_the_streaming_evaluator(request, heldout_ids, model_name, budget, max_tokens, prompt,
                                                chunks):
    check_serving_is_the_policy(request.getfixturevalue(model_name), H2O(budget=budget, max_tokens=max_tokens),
                                heldout_ids[:prompt], 8, chunks, block_size=16, num_blocks=32, kv_policy="h2o",
                                kv_budget=budget, kv_max_tokens=max_tokens)


def kept_positions(cache, seq: str) -> list[list[list[int]]]:
    """[layer][kv head] -> sorted positions a sequence keeps (read from its blocks)."""
    store, n = cache.pools, cache.policy.slots_for(cache.seq_len(seq))
    slots = store._slots(cache.block_table(seq), n)
    return [[sorted(pos.view(-1, pos.shape[-1])[slots, h].tolist()) for h in range(pos.shape[-1])]
            for pos in store.pos]


@pytest.mark.parametrize("budget,max_tokens", [(0.5, 0), (1.0, 20), (0.3, 12)])
def test_keeps_exactly_its_budget_in_blocks(random_gqa, heldout_ids, budget, max_tokens):
    cache = policy_cache(random_gqa, block_size=8, num_blocks=64, kv_policy="h2o", kv_budget=budget,
                         kv_max_tokens=max_tokens)
    rule = H2O(budget=budget, max_tokens=max_tokens)
    t = 0
    with torch.inference_mode():
        for n in (30, 1, 1, 5, 1, 1, 40, 1):
            batch = cache.schedule([("s", n)])
            assert (batch.slot_mapping == -1).all()  # eviction places tokens itself
            random_gqa.model.forward_paged(torch.tensor(heldout_ids[t:t + n]), batch.positions, batch, cache)
            t += n
            keep = min(t, max(math.floor(budget * t + 1e-9), 1), max_tokens or t)
            assert rule.keep(t) == keep
            assert cache.num_blocks - cache.num_free_blocks == math.ceil(keep / 8)
            recent = math.ceil(0.5 * keep)
            for per_head in kept_positions(cache, "s"):
                for kept in per_head:
                    assert len(kept) == len(set(kept)) == keep
                    assert kept[-recent:] == list(range(t - recent, t))  # the recent window is all there
    cache.free("s")
    assert cache.num_free_blocks == cache.num_blocks


def test_capacity_follows_the_budget_and_batching_changes_nothing(random_gqa, heldout_ids):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = [heldout_ids[:90], heldout_ids[30:50], heldout_ids[60:131]]
    cfg = CacheConfig(block_size=16, num_blocks=64, kv_policy="h2o", kv_budget=0.5, kv_max_tokens=48)
    engine = Engine(random_gqa, cfg)
    assert engine.cache.blocks_needed("new", 90) == 3  # 45 tokens kept of 90: 3 blocks, not 6
    alone = [Engine(random_gqa, cfg).generate([p], params)[0].token_ids for p in prompts]
    rids = [engine.add_request(p, params) for p in prompts]
    got, most = {r: [] for r in rids}, 0
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.token_ids
        most = max(most, engine.cache.num_blocks - engine.cache.num_free_blocks)
    assert [got[r] for r in rids] == alone
    assert most <= 3 * 3  # never more than 48 tokens (3 blocks) per sequence, however long it grows
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("model_name", ["random_gqa", "bundled"])  # 3 and 6 layers
def test_a_step_reads_the_host_as_often_whatever_the_layers(request, model_name):
    """Eviction pools walk a step's sequences on the host: they read lengths, query starts and tables once per
    step (`PolicyPools.sequences`), not once per layer; with the sampled ids, 4 reads a step at any depth."""
    from zeroc.bench.step_costs import count_syncs

    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded, CacheConfig(16, 64, kv_policy="h2o", kv_budget=0.5))
    for prompt in ([5, 6, 7, 8, 9], [11, 12, 13]):
        engine.add_request(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
    reads = []
    while engine.has_unfinished():
        with count_syncs(engine.device) as n:
            engine.step()
        reads.append(n[0])
    assert set(reads) == {4}
