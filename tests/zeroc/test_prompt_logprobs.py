"""Prompt log-probabilities (zeroc/prompt_logprobs.py) against Hugging Face transformers' forward of the same model,
through chunked prefill, mixed batches, running ahead and preemption, on every attention backend."""

from __future__ import annotations

import pytest
import torch

from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.prompt_logprobs import PromptLogprobs, PromptRows
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function len returns", "import os\nimport sys\n", "A list comprehension is a"]


def _reference(hf, ids: list[int], k: int) -> tuple[list[float], list[list[int]]]:
    """Each prompt token's log-probability from the second on, and the k best ids at its position."""
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [P, vocab]
    chosen = logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    return chosen.tolist(), torch.topk(logp[:-1], k, dim=-1).indices.tolist()


def _check(result, hf, k: int) -> None:
    want, best = _reference(hf, result.prompt_token_ids, max(k, 1))
    got = result.prompt_logprobs
    assert got is not None and len(got) == len(result.prompt_token_ids) - 1
    assert [lp.logprob for lp in got] == pytest.approx(want, abs=2e-4)
    assert all(len(lp.top) == k for lp in got)
    agree = sum([t for t, _ in lp.top] == b[:k] for lp, b in zip(got, best))
    assert agree >= len(got) - 1  # a near tie may swap two alternatives; no more than one position
    for lp in got:  # the alternatives' values are the log-softmax's, best first
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_prompt_logprobs_are_transformers_through_chunked_prefill(random_gqa_dir, hf_model_of, backend):
    """Prompts chunked over several steps (a 16-token budget) beside a request that asks for nothing and one
    that asks for generated-token log-probabilities too; generation is what it is without them."""
    engine = Engine(load_model(random_gqa_dir, attention_backend=backend), CacheConfig(16, 256),
                    SchedulerConfig(max_num_batched_tokens=16))
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=3),
              SamplingParams(max_new_tokens=4, ignore_eos=True),
              SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=0, logprobs=2)]
    prompts = [PROMPTS[0] * 5, PROMPTS[1], PROMPTS[2] * 2]
    got = engine.generate(prompts, params)
    assert len(got[0].prompt_token_ids) > 32  # three chunks at least
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    hf = hf_model_of(random_gqa_dir)
    _check(got[0], hf, 3)
    _check(got[2], hf, 0)
    assert got[1].prompt_logprobs is None and len(got[2].logprobs) == 4 and len(got[2].logprobs[0].top) == 2
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("ahead", [False, True])
def test_each_prompt_position_is_scored_once_under_preemption(random_gqa, ahead):
    """A cache too small for every request preempts and recomputes prompts; each request still gets its P - 1
    entries once, the values a roomy cache gives, whether or not steps run ahead."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, prompt_logprobs=1)
    prompts = [p * 3 for p in PROMPTS]
    tight = Engine(random_gqa, CacheConfig(16, 9), SchedulerConfig(async_scheduling=ahead))
    got = tight.generate(prompts, params)
    assert tight.num_preemptions > 0
    roomy = Engine(random_gqa, CacheConfig(16, 256)).generate(prompts, params)
    for a, b in zip(got, roomy):
        assert len(a.prompt_logprobs) == len(a.prompt_token_ids) - 1
        assert [x.logprob for x in a.prompt_logprobs] == pytest.approx([x.logprob for x in b.prompt_logprobs],
                                                                        abs=1e-5)
        assert a.token_ids == b.token_ids


def test_a_one_token_prompt_has_no_entries_and_a_cached_prefix_is_refused(random_gqa):
    engine = Engine(random_gqa, CacheConfig(16, 64))
    bos = engine.tokenizer.encode("x")[:1]
    (one,) = engine.generate([bos], SamplingParams(max_new_tokens=2, prompt_logprobs=2))
    assert one.prompt_logprobs == () and len(one.token_ids) == 2
    ids = engine.tokenizer.encode(PROMPTS[0])
    engine.reserve("cached", 4)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.add_request(ids, SamplingParams(prompt_logprobs=0), "cached", cached_tokens=4)
    engine.abort("cached")
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in"):
        SamplingParams(prompt_logprobs=21)


def test_rows_are_planned_for_unscored_positions_only():
    """Chunks after decode rows: row indices in the step's token layout, each scoring the next prompt token."""
    a, b = PromptLogprobs(1, [10, 11, 12, 13, 14]), PromptLogprobs(0, [20, 21, 22])
    rows = PromptRows.plan([(a, 0, 3), (None, 0, 4), (b, 0, 3)], decode_rows=2)
    assert rows.indices == (2, 3, 4, 9, 10) and rows.targets == (11, 12, 13, 21, 22)
    assert rows.owners == ((a, 3), (b, 2)) and rows.k == 1
    rest = PromptRows.plan([(a, 3, 2)], decode_rows=0)  # the last chunk: position 4 has no prompt token after it
    assert rest.indices == (0,) and rest.targets == (14,)
    assert PromptRows.plan([(a, 0, 5)], decode_rows=0) is None  # recomputed after preemption: scored already


def test_rows_scored_a_slice_at_a_time_are_the_rows_scored_at_once(random_gqa, monkeypatch):
    import zeroc.prompt_logprobs as prompt_logprobs

    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=2)
    whole = Engine(random_gqa, CacheConfig(16, 64)).generate(PROMPTS, params)
    monkeypatch.setattr(prompt_logprobs, "SCORE_ROWS", 3)
    sliced = Engine(random_gqa, CacheConfig(16, 64)).generate(PROMPTS, params)
    assert [r.prompt_logprobs for r in sliced] == [r.prompt_logprobs for r in whole]
    assert all(len(r.prompt_logprobs) > 3 for r in sliced)
