"""Priority scheduling (SchedulerConfig.policy "priority", vLLM's): waiting requests run by priority, lower first,
then in arrival order; under memory pressure the running request of the highest value is preempted, where fcfs
preempts the newest; fcfs refuses any priority but 0. Each order is checked against the other policy's, so a
scheduler that ignored priorities would fail."""

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
