"""The engine's persistent device batch: equal to a rebuild from the cache after every step, and the
engine's greedy tokens equal a dense full-recompute oracle (ragged prompts, preemption, late joins)."""

from __future__ import annotations

import torch

from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\n" * 5, "A list comprehension is", "Exceptions are raised" * 3]


def dense_greedy(loaded, prompt: str, n: int) -> list[int]:
    """The oracle: the whole sequence through the dense causal forward for every token."""
    ids = loaded.tokenizer.encode(prompt)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(loaded.model(torch.tensor([ids + out]))[0, -1].argmax()))
    return out


def assert_state_matches_rebuild(engine: Engine) -> None:
    """Rows of the sequences still running: block table, length and next input token as a rebuild from
    the cache's tables and the sequences' ids gives them, in running order."""
    snap = {rid: (table, n) for rid, table, n in engine.state.snapshot()}
    rows = {rid: i for i, rid in enumerate(engine.state.rows)}
    tokens = engine.state.token_ids.tolist()
    order = [rows[s.request_id] for s in engine.running]
    assert order == sorted(order)
    for seq in engine.running:
        rid = seq.request_id
        assert snap[rid] == (engine.cache.block_table(rid), engine.cache.seq_len(rid))
        assert tokens[rows[rid]] == seq.output_ids[-1]


def test_state_equals_a_rebuild_after_every_step_and_tokens_equal_the_dense_oracle(random_gqa):
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    short = SamplingParams(max_new_tokens=5, ignore_eos=True)
    # 7 blocks of 16 cannot hold all four sequences to the end: the newest is preempted and recomputed
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=7), SchedulerConfig(max_num_seqs=8))
    ids = [engine.add_request(p, short if i == 1 else params) for i, p in enumerate(PROMPTS[:3])]
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = preempted = 0
    while engine.has_unfinished():
        if steps == 3:  # a late join, mid-flight
            late = engine.add_request(PROMPTS[3], params)
            got[late] = []
        for o in engine.step():
            got[o.request_id] += o.token_ids
            preempted = max(preempted, o.preemptions)
        assert_state_matches_rebuild(engine)
        steps += 1
    assert preempted >= 1
    for (rid, tokens), prompt, n in zip(got.items(), PROMPTS, (30, 5, 30, 30)):
        assert tokens == dense_greedy(random_gqa, prompt, n), rid
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_an_aborted_row_is_compacted_away_and_the_rest_continue(random_gqa):
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = Engine(random_gqa, CacheConfig(16, 64))
    ids = [engine.add_request(p, params) for p in PROMPTS]
    got = {rid: [] for rid in ids}
    for _ in range(2):
        for o in engine.step():
            got[o.request_id] += o.token_ids
    engine.abort(ids[1])
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.token_ids
        assert_state_matches_rebuild(engine)
    assert ids[1] not in engine.state.rows
    for i in (0, 2, 3):
        assert got[ids[i]] == dense_greedy(random_gqa, PROMPTS[i], 8)
