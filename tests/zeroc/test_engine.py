"""Continuous batching, preemption, cancellation and stop conditions of the engine."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from zeroc.config import CacheConfig, SchedulerConfig, ZeroCError
from zeroc.engine import Engine, PromptTooLongError
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\n", "A list comprehension is", "Exceptions are raised"]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def _alone(model, prompt, params=GREEDY):
    return Engine(model, CacheConfig(16, 256)).generate([prompt], params)[0]


def _drain(engine):
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o)
    return out


def test_requests_joining_mid_flight_match_running_alone(random_gqa):
    engine = Engine(random_gqa, CacheConfig(16, 256))
    first = engine.add_request(PROMPTS[0], GREEDY)
    outs = {first: []}
    for _ in range(3):
        for o in engine.step():
            outs[o.request_id].append(o)
    late = engine.add_request(PROMPTS[1], GREEDY)
    for rid, steps in _drain(engine).items():
        outs.setdefault(rid, []).extend(steps)
    for rid, prompt in ((first, PROMPTS[0]), (late, PROMPTS[1])):
        tokens = [t for o in outs[rid] for t in o.token_ids]
        assert tokens == _alone(random_gqa, prompt).token_ids
        assert outs[rid][-1].finish_reason == "length"
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_abort_frees_blocks_at_once_and_others_continue(random_gqa):
    engine = Engine(random_gqa, CacheConfig(16, 64))
    keep = engine.add_request(PROMPTS[0], GREEDY)
    drop = engine.add_request(PROMPTS[2] * 20, GREEDY)
    engine.step()
    used = engine.cache.num_blocks - engine.cache.num_free_blocks
    assert engine.abort(drop) and not engine.abort(drop)
    assert engine.cache.num_blocks - engine.cache.num_free_blocks < used
    assert engine.cache.block_table(drop) == []
    rest = _drain(engine)
    assert drop not in rest and rest[keep][-1].finished
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_preemption_under_a_small_cache_keeps_greedy_output(random_gqa):
    """A cache too small for all sequences forces recompute; the output must not change."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = [p * 3 for p in PROMPTS]
    expected = [_alone(random_gqa, p, params).token_ids for p in prompts]
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=9))
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == expected
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_outputs_report_preemptions_and_time_queued(random_gqa):
    """What the decode service puts in Usage (preemptions, queue_ms): sequences pushed out of a
    too-small cache count it; one that fits only after another finished reports that wait."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=9))
    for p in PROMPTS:
        engine.add_request(p * 3, params)
    assert sum(outs[-1].preemptions for outs in _drain(engine).values()) >= 1
    alone = Engine(random_gqa, CacheConfig(16, 256))
    rid = alone.add_request(PROMPTS[0], params)
    assert _drain(alone)[rid][-1].preemptions == 0

    # Room for one 40-token sequence at a time (3 of 4 blocks): the second waits for the first to finish.
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=4))
    prompt = engine.tokenizer.encode(PROMPTS[1] * 12)[:40]
    first = engine.add_request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    second = engine.add_request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    added = time.monotonic()
    first_done = None
    outs: dict[str, list] = {first: [], second: []}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
            if o.request_id == first and o.finished:
                first_done = time.monotonic()
    assert outs[first][-1].queued_s < first_done - added
    assert outs[second][-1].queued_s >= first_done - added
    assert all(o.preemptions == 0 for o in outs[first] + outs[second])


def test_seeded_sampling_is_independent_of_the_batch(random_gqa):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    alone = _alone(random_gqa, PROMPTS[3], params).token_ids
    batched = Engine(random_gqa, CacheConfig(16, 256)).generate(
        PROMPTS, [GREEDY, GREEDY, GREEDY, params])[3].token_ids
    assert alone == batched
    other = _alone(random_gqa, PROMPTS[3], SamplingParams(**{**params.__dict__, "seed": 43})).token_ids
    assert other != alone


def test_stop_token_id_ends_generation_on_that_token(random_gqa):
    free_run = _alone(random_gqa, PROMPTS[0]).token_ids
    stop_id = free_run[4]
    cut = free_run.index(stop_id)
    res = _alone(random_gqa, PROMPTS[0], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_id,)))
    assert res.token_ids == free_run[: cut + 1] and res.finish_reason == "stop"


def test_stop_string_truncates_text_and_is_never_streamed(bundled):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    full = _alone(bundled, PROMPTS[0], params).text
    stop = full[len(full) // 3: len(full) // 3 + 3]
    assert stop.strip(), f"degenerate stop string from {full!r}"
    engine = Engine(bundled, CacheConfig(16, 256))
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,)))
    steps = _drain(engine)[rid]
    streamed = "".join(o.text_delta for o in steps)
    assert streamed == full[: full.index(stop)]
    assert steps[-1].finish_reason == "stop"


def test_a_sequence_that_fills_the_whole_cache_stops_with_length(random_gqa):
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=2))
    res = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert res.finish_reason == "length"
    # 32 slots hold 32 tokens' K/V; the token sampled last needs no slot.
    assert len(res.prompt_token_ids) + len(res.token_ids) == 32 + 1
    assert engine.cache.num_free_blocks == 2


@pytest.mark.parametrize("prompt, error", [
    ("", ZeroCError),
    ([], ZeroCError),
    ([10**9], ZeroCError),
    ("word " * 3000, PromptTooLongError),
])
def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(random_gqa, prompt, error):
    engine = Engine(random_gqa, CacheConfig(16, 256), SchedulerConfig())
    with pytest.raises(error):
        engine.add_request(prompt, GREEDY)
    assert engine.generate([PROMPTS[0]], GREEDY)[0].token_ids == _alone(random_gqa, PROMPTS[0]).token_ids


def test_duplicate_request_ids_are_rejected(random_gqa):
    engine = Engine(random_gqa, CacheConfig(16, 64))
    engine.add_request(PROMPTS[0], GREEDY, request_id="x")
    with pytest.raises(ZeroCError, match="already in use"):
        engine.add_request(PROMPTS[1], GREEDY, request_id="x")


def test_a_sequence_holding_prefix_blocks_is_admitted_before_one_waiting_for_them(random_gqa):
    """FCFS would deadlock here: the head of the queue needs all 4 blocks, 3 of which the second
    request holds (its prefix KV, reserved and filled before it was added)."""
    greedy = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ids = list(range(10, 59))  # 49 tokens: 4 blocks of 16 with the new tokens
    want = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=8)).generate([ids], greedy)[0].token_ids
    engine = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=4))
    first = engine.add_request(list(range(100, 149)), greedy)  # queued first, holds nothing
    slots = engine.reserve("held", 48)
    reference = Engine(random_gqa, CacheConfig(block_size=16, num_blocks=8))
    reference.add_request(ids, SamplingParams(max_new_tokens=2), "r")
    reference.step()  # the prompt's KV, computed once, copied into the reserved slots
    table = torch.tensor(reference.cache.block_table("r")[:3])
    for layer in range(engine.cache.num_layers):
        for got, src in zip(engine.cache.layer(layer), reference.cache.layer(layer)):
            got.view(-1, *got.shape[2:])[slots] = src[table].reshape(48, *src.shape[2:])
    engine.add_request(ids, greedy, "held", cached_tokens=48)
    out: dict[str, list[int]] = {first: [], "held": []}
    for _ in range(40):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert not engine.has_unfinished() and out["held"] == want and len(out[first]) == 4
    assert engine.cache.num_free_blocks == 4


def test_a_seeded_request_samples_the_same_alone_and_among_mixed_parameters(bundled):
    seeded = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=40, seed=5, ignore_eos=True)
    alone = _alone(bundled, PROMPTS[1], seeded).token_ids
    others = [SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.8, ignore_eos=True), GREEDY,
              SamplingParams(max_new_tokens=12, temperature=1.2, seed=9, ignore_eos=True)]
    mixed = Engine(bundled, CacheConfig(16, 256)).generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
                                                           [others[0], seeded, others[1], others[2]])
    assert mixed[1].token_ids == alone


def test_a_sequence_with_non_finite_logits_fails_alone(random_gqa):
    """Poisoned KV (NaN in one sequence's blocks) makes that sequence's logits NaN: it finishes with
    "error" and a message, its blocks are freed, and the others produce their tokens as if alone."""
    engine = Engine(random_gqa, CacheConfig(16, 256))
    ok = [engine.add_request(PROMPTS[i], GREEDY) for i in (0, 2)]
    bad = engine.add_request(PROMPTS[1], GREEDY)
    outs = {rid: [] for rid in ok + [bad]}
    for o in engine.step():
        outs[o.request_id].append(o)
    for layer in range(engine.cache.num_layers):
        engine.cache.layer(layer)[0][engine.cache.block_table(bad)] = float("nan")
    for rid, steps in _drain(engine).items():
        outs[rid].extend(steps)
    assert outs[bad][-1].finish_reason == "error" and "not finite" in outs[bad][-1].error
    assert len(outs[bad]) == 2 and engine.cache.block_table(bad) == []
    for rid, i in zip(ok, (0, 2)):
        assert [t for o in outs[rid] for t in o.token_ids] == _alone(random_gqa, PROMPTS[i]).token_ids
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].error is None
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_chunked_prefill_keeps_the_tokens_and_the_step_budget(random_gqa):
    """A budget of 24 tokens per step: long prompts are computed in chunks beside the running decodes, no
    step computes more than the budget, and every sequence's tokens are those it gets alone."""
    prompts = [PROMPTS[0], PROMPTS[1] * 20, PROMPTS[2] * 12, PROMPTS[3]]
    engine = Engine(random_gqa, CacheConfig(16, 256), SchedulerConfig(max_num_batched_tokens=24))
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    assert max(len(s.prompt_ids) for s in engine.waiting) > 2 * 24
    got = {rid: [] for rid in ids}
    while engine.has_unfinished():
        before = engine.cache.seq_len  # tokens computed this step = growth of every sequence's length
        lens = {rid: before(rid) for rid in ids}
        for o in engine.step():
            got[o.request_id] += o.token_ids
        assert sum(engine.cache.seq_len(rid) - lens[rid] for rid in ids if engine.cache.seq_len(rid)) <= 24
    for rid, p in zip(ids, prompts):
        assert got[rid] == _alone(random_gqa, p).token_ids
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_running_decodes_get_a_token_every_step_while_a_long_prompt_is_chunked_in(random_gqa):
    """Step composition under a budget the running decodes already fill: each step still gives every running
    sequence its token, a long prompt arriving meanwhile enters a block at a time (no step computes more than
    the budget plus one block, so time per output token stays bounded), and all tokens are those alone."""
    budget, block = 4, 16
    short = [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[1]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    engine = Engine(random_gqa, CacheConfig(block, 256), SchedulerConfig(max_num_batched_tokens=budget))
    ids = [engine.add_request(p, params) for p in short]
    got = {rid: [] for rid in ids}
    while len(engine.running) < len(short):
        for o in engine.step():
            got[o.request_id] += o.token_ids
    long_prompt = PROMPTS[1] * 20
    late = engine.add_request(long_prompt, GREEDY)
    got[late] = []
    chunked_steps = 0
    while engine.has_unfinished():
        decoding = {s.request_id for s in engine.running}
        lens = {rid: engine.cache.seq_len(rid) for rid in got}
        outs = engine.step()
        for o in outs:
            got[o.request_id] += o.token_ids
        assert decoding <= {o.request_id for o in outs if o.token_ids}  # no running sequence skipped a step
        computed = sum(engine.cache.seq_len(rid) - lens[rid] for rid in got if engine.cache.seq_len(rid))
        assert computed <= max(budget, len(decoding)) + block
        chunked_steps += late not in decoding and engine.cache.seq_len(late) > 0
    assert chunked_steps >= len(random_gqa.tokenizer.encode(long_prompt)) // block - 1  # it came in by blocks
    for rid, p in zip(ids, short):
        assert got[rid] == _alone(random_gqa, p, params).token_ids
    assert got[late] == _alone(random_gqa, long_prompt).token_ids
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_compiled_layers_generate_what_eager_layers_do():
    # A model of its own: compiling replaces its layers' feed-forward in place, and the shared fixtures stay eager.
    from zeroc.config import BUNDLED_MODEL
    from zeroc.loader import load_model

    loaded = load_model(BUNDLED_MODEL)
    eager = Engine(loaded, CacheConfig(16, 256)).generate(PROMPTS, GREEDY)
    engine = Engine(loaded, CacheConfig(16, 256), SchedulerConfig(compile_layers=True))
    assert all("feed_forward" in vars(layer) for layer in loaded.model.model.layers)
    compiled = engine.generate(PROMPTS, GREEDY)  # prompts of several lengths, then decode steps of 4..1 rows
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert all(len(o.token_ids) == GREEDY.max_new_tokens for o in compiled)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_every_step_reads_the_host_once_whatever_it_mixes(random_gqa_dir, backend):
    """Prefill-only, chunked-prefill-plus-decode and decode-only steps each read tensor values to the host once
    (the sampled ids): the batch carries its longest query length from the host, so no layer asks the device."""
    from zeroc.bench.step_costs import count_syncs
    from zeroc.loader import load_model

    engine = Engine(load_model(random_gqa_dir, attention_backend=backend), CacheConfig(16, 256),
                    SchedulerConfig(max_num_batched_tokens=24))
    engine.add_request(PROMPTS[0], GREEDY)
    engine.add_request(PROMPTS[1] * 12, GREEDY)  # chunked in beside the first one's decodes
    reads, mixes = [], []
    while engine.has_unfinished():
        with count_syncs(engine.device) as n:
            engine.step()
        reads.append(n[0])
        mixes.append(engine.last_step_tokens)
    assert set(reads) == {1}
    assert mixes[0] > 1 and 1 < max(mixes[1:]) and min(mixes) == 1  # prompts, mixed steps and decode-only steps


def test_the_cpu_backend_samples_by_its_kernel_with_the_torch_samplers_tokens(random_gqa_dir):
    """The cpu backend's engine samples with the CPU kernel module (kernels/csrc/sampling.cpp), the torch backend's
    with the torch path a GPU runs; on the same logits and seeds the kernel gives the torch path's tokens."""
    from zeroc.loader import load_model

    assert Engine(load_model(random_gqa_dir, attention_backend="torch")).native_sampler is None
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, seed=5),
              SamplingParams(max_new_tokens=12, temperature=1.1, seed=6), GREEDY]
    runs = []
    for native in (True, False):
        engine = Engine(load_model(random_gqa_dir, attention_backend="cpu"), CacheConfig(16, 256))
        assert engine.native_sampler is not None
        if not native:
            engine.native_sampler = None
        runs.append([o.token_ids for o in engine.generate(PROMPTS[:3], params)])
    assert runs[0] == runs[1] and len(set(runs[0][0])) > 1


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_logprobs_are_hugging_faces_log_softmax_and_change_no_token(random_gqa_dir, hf_model_of, backend):
    """Each generated token's log-probability and its position's best alternatives equal the log-softmax of
    transformers' logits for the same ids (the oracle); a batch mixing requests with and without log-probabilities
    samples the tokens each gets alone, and still reads the host once a step."""
    from zeroc.bench.step_costs import count_syncs
    from zeroc.loader import load_model

    model = load_model(random_gqa_dir, attention_backend=backend)
    asks = [SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3),
            SamplingParams(max_new_tokens=6, temperature=0.9, seed=3, ignore_eos=True, logprobs=0),
            SamplingParams(max_new_tokens=6, temperature=0.9, seed=4, ignore_eos=True)]
    engine = Engine(model, CacheConfig(16, 256))
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, asks)]
    outs, reads = {}, []
    while engine.has_unfinished():
        with count_syncs(engine.device) as n:
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o)
        reads.append(n[0])
    assert set(reads) == {1}
    hf = hf_model_of(random_gqa_dir)
    for rid, prompt, sp in zip(ids, PROMPTS, asks):
        tokens = [t for o in outs[rid] for t in o.token_ids]
        lps = [lp for o in outs[rid] for lp in o.logprobs]
        alone = Engine(model, CacheConfig(16, 256)).generate([prompt], replace(sp, logprobs=None))[0]
        assert tokens == alone.token_ids and not alone.logprobs
        if sp.logprobs is None:
            assert lps == []
            continue
        assert len(lps) == len(tokens) and all(len(lp.top) == sp.logprobs for lp in lps)
        full = torch.tensor([engine.prepare_prompt(prompt) + tokens])
        with torch.no_grad():
            want = hf(full).logits[0, -len(tokens) - 1:-1].float().log_softmax(-1)  # [T, V]
        got = torch.tensor([lp.logprob for lp in lps])
        torch.testing.assert_close(got, want.gather(1, torch.tensor(tokens)[:, None])[:, 0], atol=2e-4, rtol=0)
        for lp, row in zip(lps, want):
            best = row.topk(sp.logprobs)
            assert [t for t, _ in lp.top] == best.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), best.values, atol=2e-4, rtol=0)
        if sp.greedy:  # the greedy token is the best one
            assert all(lp.top[0][0] == t and lp.top[0][1] == lp.logprob for lp, t in zip(lps, tokens))


def test_decode_steps_of_an_unchanged_batch_copy_no_sampling_or_penalty_parameters(bundled, monkeypatch):
    """The sampled and penalized rows' parameters go to the device when the batch changes, in one copy for sampling
    and two for penalties, and serve again while it does not: steady decode steps copy none (issue 16's host
    time). The tokens are those of a batch built afresh every step."""
    import zeroc.penalties
    import zeroc.sampling

    params = [SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_new_tokens=12, temperature=1.1, top_k=20, repetition_penalty=1.2, seed=2,
                             ignore_eos=True),
              SamplingParams(max_new_tokens=6, ignore_eos=True, frequency_penalty=0.5)]
    want = [r.token_ids for r in Engine(bundled, CacheConfig(16, 64)).generate(PROMPTS[:3], params)]
    copies = []
    for module in (zeroc.sampling, zeroc.penalties):
        real = module.host_to_device
        monkeypatch.setattr(module, "host_to_device",
                            lambda values, dtype, device, real=real, name=module.__name__: (
                                copies.append((engine.host_waits, name)), real(values, dtype, device))[1])
    engine = Engine(bundled, CacheConfig(16, 64))
    got = engine.generate(PROMPTS[:3], params)
    assert [r.token_ids for r in got] == want
    # the prompts' step (which admits the penalized requests: their token counts go over too) and the first step
    # after the third request left (6 tokens): one sampling copy each; none in the 10 other steps
    assert engine.host_waits == 12 and {step for step, _ in copies} == {0, 6}
    assert [name for _, name in copies].count("zeroc.sampling") == 2
    assert [name for step, name in copies if step == 6] == ["zeroc.sampling"] + ["zeroc.penalties"] * 2
