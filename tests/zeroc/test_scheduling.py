"""The engine's scheduling (zeroc/scheduling.py) under both policies. Priority (SchedulerConfig.policy "priority",
vLLM's): waiting requests run by priority, lower first, then in arrival order; under memory pressure the request of
the highest value is preempted, where fcfs preempts the newest; fcfs refuses any priority but 0. Each order is
checked against the other policy's, so a scheduler that ignored priorities would fail. Waiting sequences that hold
blocks never leave the engine stuck, and never cut a running request short."""

from __future__ import annotations

import pytest

from zeroc.config import CacheConfig, SchedulerConfig, ZeroCError
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\n", "A list comprehension is", "Exceptions are raised"]
PARAMS = SamplingParams(max_new_tokens=3, ignore_eos=True)


def _first_token_order(engine: Engine, priorities: list[int]) -> list[int]:
    """The indexes of the requests in the order their first token came."""
    ids = [engine.add_request(p, PARAMS, priority=prio) for p, prio in zip(PROMPTS, priorities)]
    order: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and ids.index(out.request_id) not in order:
                order.append(ids.index(out.request_id))
    return order


def test_fcfs_refuses_priorities_and_adds_nothing(random_gqa):
    engine = Engine(random_gqa, CacheConfig(16, 64))
    with pytest.raises(ZeroCError, match="--scheduling-policy priority"):
        engine.add_request(PROMPTS[0], PARAMS, priority=-1)
    assert not engine.waiting and engine.cache.num_free_blocks == engine.cache.num_blocks
    with pytest.raises(ValueError, match="scheduler.policy"):
        SchedulerConfig(policy="lifo")


def test_waiting_requests_run_by_priority_then_arrival(random_gqa):
    one_at_a_time = dict(max_num_seqs=1)
    by_priority = Engine(random_gqa, CacheConfig(16, 64), SchedulerConfig(**one_at_a_time, policy="priority"))
    assert _first_token_order(by_priority, [3, -1, 3, 0]) == [1, 3, 0, 2]
    fcfs = Engine(random_gqa, CacheConfig(16, 64), SchedulerConfig(**one_at_a_time))
    assert _first_token_order(fcfs, [0, 0, 0, 0]) == [0, 1, 2, 3]


@pytest.mark.parametrize("policy, priorities, victim", [("priority", [1, 0], 0), ("fcfs", [0, 0], 1)])
def test_the_preempted_request_is_the_one_of_the_highest_value_else_the_newest(random_gqa, policy, priorities,
                                                                              victim):
    """Two 30-token prompts fit 5 blocks of 16 until both need a third block: one is preempted, and its tokens, once
    recomputed, are still those it makes alone."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = Engine(random_gqa, CacheConfig(16, 64)).tokenizer.encode(PROMPTS[2] * 8)[:30]
    alone = Engine(random_gqa, CacheConfig(16, 64)).generate([prompt], params)[0].token_ids
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=5), SchedulerConfig(policy=policy))
    ids = [engine.add_request(prompt, params, priority=p) for p in priorities]
    last, tokens = {}, {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            last[out.request_id] = out
    assert [last[rid].preemptions > 0 for rid in ids] == [i == victim for i in range(2)]
    assert all(tokens[rid] == alone for rid in ids)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def _drain(engine: Engine, limit: int = 400) -> dict[str, list]:
    """Step until done (at most `limit` steps): each request's outputs."""
    outs: dict[str, list] = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return outs
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError(f"still unfinished after {limit} steps: {[s.request_id for s in engine.waiting]} waiting")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_sequences_that_hold_blocks_and_wait_for_each_other_move_on(bundled, policy):
    """Two received prefixes of 4 blocks each, both prompts needing 8 of the 10: the later one gives its blocks
    back (it is computed again, to the tokens it gets alone) and the first goes on."""
    prompt = bundled.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)[:128]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    alone = Engine(bundled, CacheConfig(block_size=16, num_blocks=10)).generate([prompt], params)[0].token_ids
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=10), SchedulerConfig(policy=policy))
    for rid in ("first", "second"):
        engine.reserve(rid, 64)  # as a KV transfer would fill them
        engine.add_request(prompt, params, request_id=rid, cached_tokens=64)
    outs = _drain(engine)
    assert [o.finish_reason for o in outs["first"]][-1] == "length" and engine.num_preemptions == 1
    assert [t for o in outs["second"] for t in o.token_ids] == alone and outs["second"][-1].preemptions == 1
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_running_request_is_not_cut_short_for_a_partly_computed_prompt(bundled, policy):
    """A prompt computed in chunks holds blocks while the decodes take the rest: it gives way (it arrived later),
    so the running request grows until it alone fills the cache (160 tokens), and only then ends with "length"."""
    text = bundled.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=10),
                    SchedulerConfig(max_num_batched_tokens=32, policy=policy))
    first = engine.add_request(text[:61], SamplingParams(max_new_tokens=200, ignore_eos=True))
    early = [o for _ in range(3) for o in engine.step()]
    later = engine.add_request(text[:96], SamplingParams(max_new_tokens=5, ignore_eos=True))
    outs = _drain(engine)
    produced = sum(len(o.token_ids) for o in early + outs[first])
    assert outs[first][-1].finish_reason == "length" and 61 + produced >= 160, produced
    assert sum(len(o.token_ids) for o in outs[later]) == 5 and engine.num_preemptions >= 1
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
