"""Speculative decoding by n-gram lookup (zeroc/speculative.py): drafts are what followed the latest earlier
occurrence of the text's longest matching suffix (against a plain search as the oracle); an engine that speculates
gives exactly plain greedy decoding's tokens (the oracle: the same engine without speculation), on every attention
backend, beside requests that do not speculate (penalties), through stop strings, preemption,
running ahead and ZeroC-compressed models, in fewer steps where the text repeats, leaving every block free. Seeded
sampled requests speculate to exactly the tokens they sample without speculating, alone or in a batch: each draft
token is kept while the sample at its row equals it (rejection sampling for a one-hot draft), and the generator gives
back the draws of the tokens dropped. A kept token's log-probabilities are the ones plain decoding reports."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import SamplingParams
from zeroc.speculative import NgramProposer, accept, eligible

REPEATING = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "for i in range(3):\n    print(i)\nfor i in"]
OTHERS = ["The built-in function", "import os\n"]


def _naive(ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    for n in range(min(n_max, len(ids) - 1), n_min - 1, -1):
        suffix = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start: start + n] == suffix:
                return ids[start + n: start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 255, 256, 65535, 65536, 2**24 + 1]), max_size=40),
       st.integers(0, 6), st.integers(1, 3), st.integers(0, 3))
def test_a_draft_is_what_followed_the_latest_occurrence_of_the_longest_suffix(ids, k, n_min, extra):
    """Ids whose bytes repeat across token boundaries (256, 65536, ...) must never match out of alignment."""
    proposer = NgramProposer(k, n_min, n_min + extra)
    assert proposer.propose(ids, limit=k) == (_naive(ids, k, n_min, n_min + extra) if k else [])


def test_accept_keeps_greedys_tokens_to_the_first_miss_and_one_more():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all held: the bonus token too
    assert accept([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept([5, 6], [4, 6, 1]) == [4] and accept([], [3]) == [3]
    assert eligible(SamplingParams()) and eligible(SamplingParams(temperature=0.5, top_p=0.9, seed=1))
    assert eligible(SamplingParams(logprobs=1)) and not eligible(SamplingParams(repetition_penalty=1.1))
    assert not eligible(SamplingParams(prompt_logprobs=1))
    assert not eligible(SamplingParams(min_tokens=2))
    with pytest.raises(ValueError):
        NgramProposer(4, 3, 2)


def _run(model, k: int, prompts, params, **sched) -> tuple[list, list[int], Engine]:
    """(each request's tokens, text and finish reason; the steps each produced tokens in; the engine)."""
    engine = Engine(model, CacheConfig(**sched.pop("cache", {"block_size": 16, "num_blocks": 256})),
                    SchedulerConfig(speculative_tokens=k, **sched))
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    results = [([t for o in outs[i] for t in o.token_ids], "".join(o.text_delta for o in outs[i]),
                outs[i][-1].finish_reason) for i in ids]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    return results, [sum(1 for o in outs[i] if o.token_ids) for i in ids], engine


MIXED = [SamplingParams(max_new_tokens=40, ignore_eos=True), SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                                             stop=("\n\n",)),
         SamplingParams(max_new_tokens=24, temperature=0.8, seed=5, logprobs=2), SamplingParams(max_new_tokens=24,
                                                                                 repetition_penalty=1.3),
         SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.8, top_p=0.95, seed=7)]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_speculation_gives_plain_greedys_tokens_in_fewer_steps(random_gqa_dir, bundled, backend):
    model = load_model(random_gqa_dir, attention_backend=backend)
    prompts = REPEATING + OTHERS + [REPEATING[0] * 2]
    plain, plain_steps, _ = _run(model, 0, prompts, MIXED)
    spec, spec_steps, engine = _run(model, 4, prompts, MIXED)
    assert spec == plain
    assert [engine.speculator.k > 0 and eligible(p) for p in MIXED] == [True, True, True, False, True]
    repeat = [SamplingParams(max_new_tokens=48, ignore_eos=True)] * 2  # the bundled model repeats code
    plain, plain_steps, _ = _run(bundled, 0, REPEATING, repeat)
    spec, spec_steps, engine = _run(bundled, 4, REPEATING, repeat)
    assert spec == plain and plain_steps == [48, 48] and spec_steps[0] < 30, spec_steps  # it loops: drafts hold
    stats = engine.spec_stats  # each step gave a token beside the draft tokens kept
    assert stats.accepted_tokens == 2 * 48 - sum(spec_steps) and stats.accepted_tokens <= stats.draft_tokens


SAMPLED = [SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.3, seed=3),
           SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.5, top_k=20, top_p=0.9, seed=4),
           SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.4, min_p=0.05, seed=5),
           SamplingParams(max_new_tokens=40, ignore_eos=True)]  # greedy beside them


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # the torch sampler (triton's too); the cpu backend's own
def test_seeded_sampled_requests_speculate_to_the_tokens_they_sample_without(backend):
    """The bundled model at low temperatures keeps some drafts and drops others (so generators give draws back);
    test_speculation_gives_plain_greedys_tokens_in_fewer_steps runs a sampled row on the triton backend too."""
    model = load_model(BUNDLED_MODEL, attention_backend=backend)
    prompts = [REPEATING[0], REPEATING[1], REPEATING[0] * 2, OTHERS[0]]
    plain, _, _ = _run(model, 0, prompts, SAMPLED)
    spec, _, _ = _run(model, 4, prompts, SAMPLED)
    assert spec == plain
    alone = [_run(model, 4, [p], [sp]) for p, sp in zip(prompts[:3], SAMPLED)]  # batch-independent
    assert [results[0] for results, _, _ in alone] == spec[:3]
    accepted, drafted = (sum(getattr(e.spec_stats, f) for _, _, e in alone) for f in ("accepted_tokens",
                                                                                       "draft_tokens"))
    assert 0 < accepted < drafted and sum(sum(steps) for _, steps, _ in alone) < 3 * 40
    unseeded = [SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.3)] * 3  # the shared generator
    results, _, engine = _run(model, 4, prompts[:3], unseeded)
    assert [len(r[0]) for r in results] == [40] * 3 and engine.spec_stats.drafts > 0


def test_speculating_requests_report_each_kept_tokens_logprobs(bundled):
    params = [SamplingParams(max_new_tokens=32, ignore_eos=True, logprobs=3),
              SamplingParams(max_new_tokens=32, ignore_eos=True, temperature=0.4, seed=2, logprobs=1)]

    def run(k: int):
        engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=256), SchedulerConfig(speculative_tokens=k))
        ids = [engine.add_request(p, sp) for p, sp in zip(REPEATING, params)]
        got = {i: ([], []) for i in ids}
        while engine.has_unfinished():
            for o in engine.step():
                got[o.request_id][0].extend(o.token_ids)
                got[o.request_id][1].extend(o.logprobs)
        return [got[i] for i in ids], engine

    plain, _ = run(0)
    spec, engine = run(4)
    assert engine.spec_stats.accepted_tokens > 0
    for (want_ids, want), (ids, got) in zip(plain, spec):
        assert ids == want_ids and len(got) == len(ids) == 32
        assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want], abs=1e-4)
        assert [[t for t, _ in lp.top] for lp in got] == [[t for t, _ in lp.top] for lp in want]
        assert [v for lp in got for _, v in lp.top] == pytest.approx([v for lp in want for _, v in lp.top], abs=1e-4)


def test_speculation_through_preemption_and_running_ahead(bundled):
    prompts = [p * 3 for p in REPEATING + OTHERS]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True)] * 4
    plain, _, _ = _run(bundled, 0, prompts, params)
    small, _, engine = _run(bundled, 6, prompts, params, cache={"block_size": 16, "num_blocks": 14})
    assert small == plain and engine.num_preemptions > 0
    ahead, _, _ = _run(bundled, 3, prompts, params, async_scheduling=True)
    assert ahead == plain


def test_drafts_stay_within_the_steps_token_budget(bundled):
    prompts, params = REPEATING * 2, [SamplingParams(max_new_tokens=40, ignore_eos=True)] * 4
    plain, _, _ = _run(bundled, 0, prompts, params)

    def run(budget: int) -> list[int]:
        """The sizes of the steps that ran no prompt."""
        engine = Engine(bundled, CacheConfig(block_size=16, num_blocks=256),
                        SchedulerConfig(speculative_tokens=4, max_num_batched_tokens=budget))
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        outs, sizes = {i: [] for i in ids}, []
        while engine.has_unfinished():
            prompts_left = bool(engine.waiting)
            for o in engine.step():
                outs[o.request_id] += o.token_ids
            sizes += [] if prompts_left else [engine.last_step_tokens]
        assert [outs[i] for i in ids] == [r[0] for r in plain] and engine.spec_stats.accepted_tokens > 0
        return sizes

    assert max(run(64)) > 8 and max(run(8)) <= 8  # 4 decode rows and 4 draft tokens at most


def test_compressed_models_speculate_and_policies_that_cannot_take_rows_back_do_not(zeroc_modes_dir, bundled):
    model = load_model(zeroc_modes_dir)
    params = [SamplingParams(max_new_tokens=32, ignore_eos=True)] * 2
    plain, plain_steps, _ = _run(model, 0, REPEATING, params)
    spec, spec_steps, _ = _run(model, 4, REPEATING, params)
    assert spec == plain and sum(spec_steps) < sum(plain_steps)
    kivi = Engine(bundled, CacheConfig(block_size=32, num_blocks=64, kv_policy="kivi-4"),
                  SchedulerConfig(speculative_tokens=4))
    assert kivi.speculator.k == 0
