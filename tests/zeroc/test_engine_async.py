"""Async scheduling (scheduler.async_scheduling): step n is launched before step n-1's ids reach the host.

Every request must stream exactly what the synchronous engine streams (tokens, text, finish reason), under
joins, aborts, preemption, chunked prefill, stop tokens and strings, seeded sampling and failing rows; a
sequence's blocks must outlive every step in flight that holds its row, and nothing may leak."""

from __future__ import annotations

import pytest
import torch

from zeroc.bench.step_costs import count_syncs
from zeroc.config import CacheConfig, SchedulerConfig, ZeroCConfig
from zeroc.engine import Engine, runs_ahead
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\n", "A list comprehension is", "Exceptions are raised"]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def _engine(model, async_scheduling, blocks=256, **sched):
    return Engine(model, CacheConfig(16, blocks), SchedulerConfig(async_scheduling=async_scheduling, **sched))


def _run(engine, requests, actions=None):
    """Step `engine` through `requests` [(prompt, params)], calling actions[k](engine, ids) before step k.
    -> {request index: (token ids, text, finish reason, error)}, and the number of step() calls."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    index = {rid: i for i, rid in enumerate(ids)}
    got = {i: ([], "", None, None) for i in range(len(ids))}
    steps = 0
    while engine.has_unfinished() or (actions and steps in actions):
        if actions and steps in actions:
            new = actions[steps](engine, ids)
            for j, rid in enumerate(new or [], start=len(index)):
                index[rid] = j
                got[j] = ([], "", None, None)
        for o in engine.step():
            toks, text, reason, err = got[index[o.request_id]]
            assert reason is None, f"{o.request_id} produced output after finishing"
            got[index[o.request_id]] = (toks + o.token_ids, text + o.text_delta, o.finish_reason, o.error)
        steps += 1
    assert engine.cache.num_free_blocks == engine.cache.num_blocks, "blocks leaked"
    return got, steps


def _both(model, requests, actions=None, **kw):
    sync, _ = _run(_engine(model, False, **kw), requests, actions)
    run_ahead, _ = _run(_engine(model, True, **kw), requests, actions)
    return sync, run_ahead


def test_mixed_sampling_and_stop_conditions_stream_what_the_synchronous_engine_does(bundled):
    free = Engine(bundled, CacheConfig(16, 256)).generate([PROMPTS[0]], SamplingParams(max_new_tokens=24,
                                                                                        ignore_eos=True))[0]
    stop_string = free.text[len(free.text) // 3: len(free.text) // 3 + 3]
    requests = [
        (PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop_string,))),
        (PROMPTS[1], SamplingParams(max_new_tokens=10, stop_token_ids=(free.token_ids[4],))),
        (PROMPTS[2], SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7,
                                    ignore_eos=True)),
        (PROMPTS[3], SamplingParams(max_new_tokens=1, ignore_eos=True)),
        (PROMPTS[0] * 2, SamplingParams(max_new_tokens=16)),
    ]
    sync, run_ahead = _both(bundled, requests)
    assert run_ahead == sync
    assert sync[0][2] == "stop" and stop_string not in sync[0][1]
    assert sync[3][2] == "length" and len(sync[3][0]) == 1


def test_joins_and_aborts_between_steps_match(random_gqa):
    def join(engine, ids):
        return [engine.add_request(PROMPTS[3], GREEDY)]

    def drop(engine, ids):
        engine.abort(ids[1])

    requests = [(PROMPTS[0], GREEDY), (PROMPTS[1] * 8, GREEDY), (PROMPTS[2], GREEDY)]
    sync, run_ahead = _both(random_gqa, requests, {2: join, 4: drop})
    assert {i: run_ahead[i] for i in (0, 2, 3)} == {i: sync[i] for i in (0, 2, 3)}
    assert all(len(sync[i][0]) == 10 for i in (0, 2, 3))
    # Aborted after the same number of step() calls, the run-ahead engine has streamed one token fewer (its
    # outputs trail by a step): the same tokens so far, and no finish output either way.
    for got in (sync[1], run_ahead[1]):
        assert got[2] is None and 0 < len(got[0]) < 10
    assert run_ahead[1][0] == sync[1][0][: len(run_ahead[1][0])]


def test_preemption_and_chunked_prefill_match(random_gqa):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    requests = [(p * 3, params) for p in PROMPTS]
    sync, run_ahead = _both(random_gqa, requests, blocks=9)
    assert run_ahead == sync
    requests = [(PROMPTS[0], GREEDY), (PROMPTS[1] * 20, GREEDY), (PROMPTS[2] * 12, GREEDY)]
    sync, run_ahead = _both(random_gqa, requests, max_num_batched_tokens=24)
    assert run_ahead == sync


def test_a_row_with_non_finite_logits_fails_alone(random_gqa):
    def poison(engine, ids):
        for layer in range(engine.cache.num_layers):
            engine.cache.layer(layer)[0][engine.cache.block_table(ids[1])] = float("nan")

    requests = [(PROMPTS[i], GREEDY) for i in range(3)]
    sync, run_ahead = _both(random_gqa, requests, {1: poison})
    assert run_ahead == sync
    assert sync[1][2] == "error" and [sync[i][2] for i in (0, 2)] == ["length", "length"]


def test_a_stopped_sequence_keeps_its_blocks_until_the_step_holding_its_row_has_run(random_gqa):
    free = Engine(random_gqa, CacheConfig(16, 256)).generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop = SamplingParams(max_new_tokens=10, stop_token_ids=(free[3],))
    engine = _engine(random_gqa, True)
    rid = engine.add_request(PROMPTS[0], stop)
    other = engine.add_request(PROMPTS[1], GREEDY)
    while True:
        outs = {o.request_id: o for o in engine.step()}
        if rid in outs and outs[rid].finished:
            break
    # The step launched before that result was read still has a row for it (its token is discarded).
    assert engine.cache.block_table(rid) != []
    assert rid not in {o.request_id for o in engine.step()}
    assert engine.cache.block_table(rid) == []
    while engine.has_unfinished():
        engine.step()
    assert engine.cache.block_table(other) == [] and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_sequences_ending_by_length_take_no_extra_row(random_gqa):
    """The scheduler knows a length finish in advance: async runs launch exactly the synchronous steps."""
    requests = [(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True))]
    sync_engine, async_engine = _engine(random_gqa, False), _engine(random_gqa, True)
    _, sync_steps = _run(sync_engine, requests)
    _, async_steps = _run(async_engine, requests)
    assert sync_engine.host_waits == async_engine.host_waits == 5  # one launched step per token
    assert async_steps == sync_steps + 1  # the last call only reads the last step's ids


def test_a_decode_step_reads_the_host_once_and_runs_ahead(random_gqa):
    engine = _engine(random_gqa, True)
    rid = engine.add_request(PROMPTS[0], GREEDY)
    assert engine.step() == []  # launched; its id is not read yet
    assert [o.token_ids for o in engine.step()] != []  # the first token, read while the second step runs
    with count_syncs(engine.device) as syncs:
        out = engine.step()
    assert syncs[0] == 1 and len(out) == 1 and out[0].request_id == rid
    assert engine.has_unfinished()


def test_async_scheduling_is_a_root_config_setting_on_by_default_on_cuda_only():
    read = lambda raw: ZeroCConfig.from_env({"ZEROC_SCHEDULER_ASYNC_SCHEDULING": raw}).scheduler  # noqa: E731
    assert read("1").async_scheduling is True and read("off").async_scheduling is False
    assert read("auto").async_scheduling is None and ZeroCConfig.from_env({}).scheduler.async_scheduling is None
    with pytest.raises(ValueError, match="expected one of .*auto"):
        read("sometimes")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [runs_ahead(read(raw), dev) for raw in ("auto", "1", "0") for dev in (cpu, cuda)] == [
        False, True, True, True, False, False]


def test_an_engine_on_the_cpu_steps_synchronously_by_default(random_gqa):
    engine = Engine(random_gqa, CacheConfig(16, 64))
    engine.add_request(PROMPTS[0], GREEDY)
    assert not engine.runs_ahead and engine.step() != []  # the first token, not trailing by a step


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_generate_is_the_same_either_way(random_gqa, async_scheduling):
    got = _engine(random_gqa, async_scheduling).generate(PROMPTS, GREEDY)
    alone = [_engine(random_gqa, False).generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert [g.token_ids for g in got] == alone


def test_logprobs_running_ahead_are_the_synchronous_engines(bundled):
    """A step's log-probabilities ride with its ids; running ahead reads them a step later, the same values."""
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(max_new_tokens=8, temperature=0.8, seed=5, ignore_eos=True, logprobs=0), GREEDY]
    runs = [_engine(bundled, ahead).generate(PROMPTS[:3], params) for ahead in (False, True)]
    for sync, ahead in zip(*runs):
        assert (sync.token_ids, sync.logprobs) == (ahead.token_ids, ahead.logprobs)
    assert [len(r.logprobs) for r in runs[0]] == [8, 8, 0] and len(runs[0][0].logprobs[0].top) == 2
