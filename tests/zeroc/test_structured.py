"""Structured output (zeroc/structured.py): every kind of guide holds for greedy and sampled requests on every
attention backend, beside free requests whose tokens it does not change, through running ahead and preemption;
bad guides are clear ValueErrors; the mask keeps what the matcher allows."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from token_markers import one_token_text
from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import Guide, SamplingParams
from zeroc.structured import GuideCompiler, GuideError
from zeroc.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog"]}}}}
EMAIL = r"[a-z]{2,6}@[a-z]{2,6}\.(com|org)"
CHOICES = ("red", "green", "blue", "a \"quoted\" colour")
GRAMMAR = 'root ::= "(" num ("," num)? ("," num)? ")"\nnum ::= [1-9] [0-9]?'


def _instance(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


CHECKS = {  # kind -> (guide, whether a text matches it: the oracle is not the library that built the mask)
    "json_schema": (Guide("json_schema", json.dumps(SCHEMA)), _instance),
    "regex": (Guide("regex", EMAIL), lambda t: re.fullmatch(EMAIL, t) is not None),
    "choice": (Guide("choice", choices=CHOICES), lambda t: t in CHOICES),
    "grammar": (Guide("grammar", GRAMMAR),
                lambda t: re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?){0,2}\)", t) is not None),
}
PROMPTS = ["The data is", "Return a value:", "import os\n"]
FREE = SamplingParams(max_new_tokens=10, temperature=0.9, seed=3)


def _guided(temperature: float, kinds=tuple(CHECKS)) -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=40, temperature=temperature, seed=11 + i, guide=CHECKS[kind][0])
            for i, kind in enumerate(kinds)]


def _assert_held(results, kinds=tuple(CHECKS)) -> None:
    for kind, r in zip(kinds, results, strict=True):
        assert r.finish_reason == "stop" and CHECKS[kind][1](r.text), (kind, r.finish_reason, r.text)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_every_guide_holds_greedy_and_sampled_beside_a_free_request(backend):
    engine = Engine(load_model(BUNDLED_MODEL, attention_backend=backend), CacheConfig(16, 256))
    # the triton backend runs in Triton's interpreter: the guides whose texts are short, greedy and sampled
    kinds = ("regex", "choice", "grammar") if backend == "triton" else tuple(CHECKS)
    params = _guided(0.0, kinds) + _guided(0.9, kinds) + [FREE]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    got = engine.generate(prompts, params)
    _assert_held(got[: len(kinds)], kinds)
    _assert_held(got[len(kinds): 2 * len(kinds)], kinds)
    # a guided neighbour changes nothing for a free request (nor for a seeded one: its draws are its own)
    assert got[-1].token_ids == engine.generate([prompts[-1]], FREE)[0].token_ids
    free = engine.generate(prompts[: len(kinds)], [SamplingParams(max_new_tokens=12)] * len(kinds))
    assert not any(CHECKS[k][1](r.text) for k, r in zip(kinds, free))  # the guides did the work
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_a_json_object_guide_gives_json_objects(bundled):
    engine = Engine(bundled, CacheConfig(16, 256))
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=96, guide=Guide("json")))
    assert all(r.text.startswith("{") for r in got)
    done = [r for r in got if r.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(r.text), dict) for r in done)


@pytest.mark.parametrize("ahead", [False, True])
def test_guides_hold_under_preemption_and_running_ahead(bundled, ahead):
    """A cache too small for every request preempts and recomputes; the guided tokens are those of a roomy cache,
    whether or not steps run ahead (a guided row's next mask waits for its token)."""
    params = _guided(0.9) * 2
    prompts = ([p * 10 for p in PROMPTS] * 3)[: len(params)]
    tight = Engine(bundled, CacheConfig(16, 8), SchedulerConfig(async_scheduling=ahead))
    got = tight.generate(prompts, params)
    assert tight.num_preemptions > 0
    roomy = Engine(bundled, CacheConfig(16, 256)).generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in roomy]
    _assert_held(got[: len(CHECKS)])


def test_a_complete_guide_ends_the_request_even_with_ignore_eos_and_logprobs_stay_the_models(bundled):
    engine = Engine(bundled, CacheConfig(16, 256))
    guided = SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=1, guide=Guide("choice", choices=CHOICES))
    got, free = engine.generate([PROMPTS[0]] * 2, [guided, SamplingParams(max_new_tokens=1)])
    assert got.finish_reason == "stop" and got.text in CHOICES
    # the first position's alternatives are the model's own: its free choice leads them, whatever the guide took
    assert got.logprobs[0].top[0][0] == free.token_ids[0] != got.token_ids[0]
    assert got.logprobs[0].logprob < got.logprobs[0].top[0][1]


@pytest.mark.parametrize("ahead", [False, True])
def test_a_guide_after_a_token_leaves_the_text_up_to_it_free(bundled, ahead):
    """A reasoning model thinks freely, then answers to the guide: `Guide.after` names the token that ends the
    free part. The text up to it is the unguided text's, token for token; what follows matches the guide."""
    engine = Engine(bundled, CacheConfig(16, 256), SchedulerConfig(async_scheduling=ahead))
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=24))[0].token_ids
    marker, text = one_token_text(bundled.tokenizer, free)
    at = free.index(marker)
    guided = SamplingParams(max_new_tokens=at + 41, guide=Guide("regex", EMAIL, after=text))
    got, alone = engine.generate([PROMPTS[0], PROMPTS[1]], [guided, SamplingParams(max_new_tokens=8)])
    assert got.token_ids[: at + 1] == free[: at + 1]
    rest = bundled.tokenizer.decode(got.token_ids[at + 1:])
    assert got.finish_reason == "stop" and re.fullmatch(EMAIL, rest), (got.text, rest)
    assert alone.token_ids == engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8))[0].token_ids
    short = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=at, guide=Guide("regex", EMAIL, after=text)))
    assert short[0].token_ids == free[:at] and short[0].finish_reason == "length"  # cut before it: never applied
    with pytest.raises(GuideError, match="must be one"):
        engine.add_request("Hi", SamplingParams(guide=Guide("regex", EMAIL, after="not one token at all")))
    with pytest.raises(ValueError, match="at most 64"):
        Guide("regex", EMAIL, after="x" * 65)
    assert not engine.has_unfinished() and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_bad_guides_are_value_errors_that_say_what_is_wrong(bundled):
    for kw, words in [(dict(kind="xml"), "kind"), (dict(kind="regex"), "needs its text"),
                      (dict(kind="json", spec="{}"), "takes none"), (dict(kind="choice"), "at least one"),
                      (dict(kind="choice", choices=("a", "")), "non-empty"),
                      (dict(kind="choice", choices=tuple(map(str, range(300)))), "at most 256"),
                      (dict(kind="regex", spec="a" * 70000), "at most 65536"),
                      (dict(kind="choice", choices=("a" * 1000,) * 66), "at most 65536 characters, got 66000"),
                      (dict(kind="json_schema", spec='{"type":"array","items":' * 65 + "{}" + "}" * 65),
                       "deeper than 64"),
                      (dict(kind="json_schema", spec='[' * 30000 + ']' * 30000), "deeper than 64"),
                      (dict(kind="json_schema", spec=json.dumps({"properties": {f"p{i}": {} for i in range(257)}})),
                       "257 properties")]:
        with pytest.raises(ValueError, match=words):
            Guide(**kw)
    engine = Engine(bundled, CacheConfig(16, 64))
    for guide, words in [(Guide("json_schema", '{"type": "objec"}'), "objec"),
                         (Guide("json_schema", "not json"), "JSON"),
                         (Guide("regex", "a(b"), "parenthesis"),
                         (Guide("grammar", "root ::= x"), '"x" is not defined')]:
        with pytest.raises(GuideError, match=words) as err:
            engine.add_request("Hi", SamplingParams(guide=guide))
        assert "does not compile" in str(err.value) and ".cc:" not in str(err.value)  # no C++ log prefix
    for scalar in ("true", "false", "5", '"x"', "null"):  # JSON, but no object: compiled or refused, never a crash
        try:
            engine.check_sampling(SamplingParams(guide=Guide("json_schema", scalar)))
        except GuideError as exc:
            assert "does not compile" in str(exc)
    assert not engine.has_unfinished()
    assert engine.generate(["Hi"], SamplingParams(max_new_tokens=8, guide=CHECKS["regex"][0]))[0].finish_reason


def test_the_mask_is_the_matchers_and_copies_unless_told_not_to(bundled):
    """A guided row keeps exactly the tokens its matcher allows (the kernels themselves: tests/kernels/
    test_token_bitmask.py); the scores are copied, or masked in place where the engine reads them no more."""
    guides = GuideCompiler(bundled.tokenizer, bundled.config.vocab_size)
    matcher = guides.start(Guide("choice", choices=("yes", "no")))[0]
    scores = torch.randn(3, bundled.config.vocab_size, generator=torch.Generator().manual_seed(0))
    before = scores.clone()
    got = guides.mask(scores, [None, matcher, None])
    assert got is not scores and torch.equal(scores, before)
    assert torch.equal(got[[0, 2]], scores[[0, 2]])
    allowed = (got[1] > torch.finfo(got.dtype).min).nonzero().flatten().tolist()
    assert allowed and all(bundled.tokenizer.decode([t]) and ("yes".startswith(bundled.tokenizer.decode([t]))
                                                              or "no".startswith(bundled.tokenizer.decode([t])))
                           for t in allowed)
    assert torch.equal(got[1, allowed], scores[1, allowed])
    same = guides.mask(scores, [None, matcher, None], copy=False)
    assert same is scores and torch.equal(same, got)
    assert guides.mask(before, [None, None, None], copy=False) is before  # nothing guided: nothing done


def _metaspace() -> Tokenizer:
    """A SentencePiece-style BPE with a bare Metaspace decoder (a word's leading space is part of its token)."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world"] * 20,
                           trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"], show_progress=False))
    return Tokenizer(hf)


@pytest.mark.parametrize("family", ["byte-level", "metaspace"])
def test_a_guide_reads_the_vocabulary_as_the_tokens_spell_text(family):
    """The tokens of a text, as the tokenizer splits it, keep a guide of that text matching, and end it; a text the
    tokens do not spell does not. (A SentencePiece token spells its word's leading space, as vLLM's guides read it.)"""
    tok = Tokenizer.from_dir(BUNDLED_MODEL) if family == "byte-level" else _metaspace()
    text = "the quick brown fox"
    ids = tok.encode(text, add_special_tokens=False)
    spelled = " " + text if family == "metaspace" else text
    guides = GuideCompiler(tok, tok.vocab_size)
    matcher = guides.start(Guide("choice", choices=(spelled, "other")))[0]
    assert all(matcher.accept_token(t) for t in ids) and matcher.is_completed()
    wrong = guides.start(Guide("choice", choices=(text.upper(),)))[0]
    assert not all(wrong.accept_token(t) for t in ids)


@pytest.mark.parametrize("text", ["smile \U0001F600", "tab\there", "nul\x00x", 'quote"back\\', "caf\u00e9 \u2615"])
def test_a_choice_of_any_characters_is_the_text_its_tokens_spell(bundled, text):
    """Choices become grammar literals: quotes, backslashes, control and non-BMP characters (which JSON would escape
    as surrogate pairs) included."""
    ids = bundled.tokenizer.encode(text, add_special_tokens=False)
    matcher = GuideCompiler(bundled.tokenizer, bundled.config.vocab_size).start(Guide("choice", choices=(text,)))[0]
    assert all(matcher.accept_token(t) for t in ids) and matcher.is_completed()
