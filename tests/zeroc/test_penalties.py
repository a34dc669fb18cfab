"""Logit bias and the repetition, frequency and presence penalties (zeroc/penalties.py) in the engine.

Oracles: Hugging Face's `generate(repetition_penalty=...)` for the repetition penalty, and a greedy loop over
transformers' logits with the bias added and the counts kept on the host for OpenAI's logit bias and frequency
and presence penalties. A
penalized request gets the same tokens alone, in a mixed batch, after preemption and running ahead."""

from __future__ import annotations

import pytest
import torch

from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import SamplingParams

PROMPT = "The built-in function"


@pytest.fixture(scope="module", params=["torch", "cpu"])
def model(request):
    """The bundled model on the torch sampler (a GPU's) and on the cpu backend's kernel sampler."""
    return load_model(BUNDLED_MODEL, attention_backend=request.param)


def _result(model, params, prompt=PROMPT, **sched):
    engine = Engine(model, CacheConfig(16, 256), SchedulerConfig(**sched))
    out = engine.generate([prompt], params)[0]
    assert not engine.penalties.slot, "a finished request kept its slot"
    return out


def _alone(model, params, prompt=PROMPT, **sched):
    return _result(model, params, prompt, **sched).token_ids


def test_repetition_penalty_is_hugging_faces(model, hf_model_of):
    hf = hf_model_of(BUNDLED_MODEL)
    ids = model.tokenizer.encode(PROMPT)
    plain = _alone(model, SamplingParams(max_new_tokens=24, ignore_eos=True))
    for r in (1.3, 0.8):
        want = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                           repetition_penalty=r)[0, len(ids):].tolist()
        got = _alone(model, SamplingParams(max_new_tokens=24, ignore_eos=True, repetition_penalty=r))
        assert got == want
        assert got != plain  # the bundled model repeats itself ("Py_Py_Py_..."): the penalty changes that


def test_logit_bias_frequency_and_presence_penalties_follow_a_host_loop(model, hf_model_of):
    hf = hf_model_of(BUNDLED_MODEL)
    ids = model.tokenizer.encode(PROMPT)
    plain = _alone(model, SamplingParams(max_new_tokens=20, ignore_eos=True))
    # the greedy path's second token banned, a token it never takes lifted
    bias = ((plain[1], -100.0), (plain[0] + 1, 3.0))
    for f, p, b in ((0.7, 0.0, ()), (0.0, 1.5, ()), (0.5, -0.4, ()), (0.0, 0.0, bias), (0.6, 0.2, bias)):
        seq, counts, added = list(ids), torch.zeros(model.config.vocab_size), torch.zeros(model.config.vocab_size)
        for t, v in b:
            added[t] = v
        with torch.no_grad():
            for _ in range(20):
                scores = hf(torch.tensor([seq])).logits[0, -1].float() + added - f * counts - p * (counts > 0)
                token = int(scores.argmax())
                counts[token] += 1
                seq.append(token)
        got = _alone(model, SamplingParams(max_new_tokens=20, ignore_eos=True, frequency_penalty=f,
                                           presence_penalty=p, logit_bias=b))
        assert got == seq[len(ids):], (f, p, b)
        if b:
            assert plain[1] not in got and got != plain


def test_logit_bias_past_the_vocabulary_is_refused(model):
    from zeroc.config import ZeroCError

    engine = Engine(model, CacheConfig(16, 64))
    with pytest.raises(ZeroCError, match="logit_bias"):
        engine.add_request(PROMPT, SamplingParams(logit_bias=((model.config.vocab_size, 1.0),)))
    assert not engine.has_unfinished()


def test_penalized_requests_are_the_same_in_a_batch_after_preemption_and_running_ahead(model):
    prompts = [PROMPT, "import os\n", "A list comprehension is", "Exceptions are raised"]
    params = [SamplingParams(max_new_tokens=16, ignore_eos=True, repetition_penalty=1.2, frequency_penalty=0.3),
              SamplingParams(max_new_tokens=16, ignore_eos=True),
              SamplingParams(max_new_tokens=16, temperature=0.9, seed=4, ignore_eos=True, presence_penalty=0.8),
              SamplingParams(max_new_tokens=16, temperature=0.9, seed=5, ignore_eos=True)]
    alone = [_alone(model, sp, p) for p, sp in zip(prompts, params)]
    for cache, ahead in ((CacheConfig(16, 256), False), (CacheConfig(16, 6), False), (CacheConfig(16, 256), True)):
        engine = Engine(model, cache, SchedulerConfig(async_scheduling=ahead))
        assert [r.token_ids for r in engine.generate(prompts, params)] == alone
        assert not engine.penalties.slot and engine.cache.num_free_blocks == engine.cache.num_blocks
        if cache.num_blocks == 6:
            assert engine.num_preemptions > 0


def test_every_step_with_penalties_reads_the_host_once(model):
    """Admitting a penalized request (its slot filled from the host's lists) and counting its tokens read nothing
    back: the step's one read stays the sampled ids."""
    from zeroc.bench.step_costs import count_syncs

    engine = Engine(model, CacheConfig(16, 256))
    engine.add_request(PROMPT, SamplingParams(max_new_tokens=6, ignore_eos=True, repetition_penalty=1.2))
    engine.add_request("import os\n", SamplingParams(max_new_tokens=6, ignore_eos=True, presence_penalty=0.5))
    reads = []
    while engine.has_unfinished():
        with count_syncs(engine.device) as n:
            engine.step()
        reads.append(n[0])
    assert set(reads) == {1} and not engine.penalties.slot


@pytest.mark.parametrize("ahead", [False, True])
def test_min_tokens_keeps_the_stop_tokens_out_of_reach_until_then(model, ahead):
    """vLLM's min_tokens: EOS, pushed to the top by logit bias, ends the text at the first step it may, not
    before, whether or not steps run ahead (their tokens count while still in flight); the stop token ids too."""
    eos = model.config.eos_token_ids[0]
    forced = SamplingParams(max_new_tokens=12, logit_bias={eos: 100.0}, min_tokens=5)
    out = _result(model, forced, async_scheduling=ahead)
    assert out.finish_reason == "stop" and len(out.token_ids) == 6 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:5]
    free = _alone(model, SamplingParams(max_new_tokens=8), async_scheduling=ahead)
    stop_id = free[1]  # the second greedy token, as a stop token id: honoured from the fourth token on
    out = _result(model, SamplingParams(max_new_tokens=8, stop_token_ids=(stop_id,), min_tokens=3),
                 async_scheduling=ahead)
    assert stop_id not in out.token_ids[:3] and out.token_ids[:1] == free[:1]
    assert out.finish_reason == "length" or out.token_ids[-1] == stop_id


def test_stop_strings_wait_for_min_tokens_and_may_stay_in_the_text(model):
    free = _result(model, SamplingParams(max_new_tokens=16))
    stop = free.text[:3]  # found in the first tokens' text
    cut = _result(model, SamplingParams(max_new_tokens=16, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == ""
    kept = _result(model, SamplingParams(max_new_tokens=16, stop=(stop,), include_stop_str_in_output=True))
    assert kept.finish_reason == "stop" and kept.text == stop
    late = _result(model, SamplingParams(max_new_tokens=16, stop=(stop,), min_tokens=4))
    assert late.token_ids[:4] == free.token_ids[:4]  # the early match ended nothing
    assert late.finish_reason == "length" or stop in free.text[3:] + late.text
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=4, min_tokens=5)
