"""Clients no one here wrote, through the gateway: the official `openai` package and `curl -N`.

The oracle is the gRPC SDK's greedy output for the same prompt, and Hugging Face's
`apply_chat_template` for what a chat becomes.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest
from transformers import AutoTokenizer

from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL

PROMPT = "The built-in function"
MESSAGES = [{"role": "system", "content": "You answer in Python."},
            {"role": "user", "content": "How do I read a file?"}]


@pytest.fixture(scope="module")
def sdk(services):
    with Client(services.decode, timeout=120) as client:
        yield client


def test_completions_equal_the_sdks_greedy_output_plain_and_streamed(api, sdk):
    want = sdk.generate(PROMPT, max_tokens=12, temperature=0.0)
    got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.model == "zeroc-tiny" and got.id.startswith("cmpl-")
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 12)
    assert got.usage.total_tokens == want.usage.prompt_tokens + 12

    chunks = list(api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_token_id_prompts_stop_strings_and_token_ids_match_the_sdk(api, sdk):
    ids = sdk.tokenize(PROMPT)
    free = sdk.generate(ids, max_tokens=16, temperature=0.0)
    stop = free.text[len(free.text) // 2:][:3]  # a stop string that occurs mid-completion
    want = sdk.generate(ids, max_tokens=16, temperature=0.0, stop=[stop])
    got = api.completions.create(model="zeroc-tiny", prompt=ids, max_tokens=16, temperature=0, stop=stop,
                                 extra_body={"return_token_ids": True})
    assert want.finish_reason == "stop" and stop not in want.text
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    assert got.choices[0].model_extra["token_ids"] == want.token_ids


def test_chat_applies_the_models_template_as_hugging_face_does(api, sdk):
    ids = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want = sdk.generate(ids, max_tokens=10, temperature=0.0)
    got = api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 10

    chunks = list(api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_completion_tokens=10,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-2].choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_equals_the_sdks(api, sdk):
    want = sdk.generate(PROMPT, max_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    texts = {api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95,
                                    seed=7, extra_body={"top_k": 50}).choices[0].text for _ in range(2)}
    assert texts == {want.text}


def test_completion_logprobs_through_the_sdk_equal_the_grpc_ones(api, sdk):
    """`logprobs: n` on /v1/completions: the legacy object, plain and streamed, with the decode service's values
    (the gRPC SDK's, the oracle here; test_client.py checks those against transformers). The gateway balances over
    a disaggregated and a colocated service, whose values differ in float rounding (1e-6)."""
    want = sdk.generate(PROMPT, max_tokens=8, temperature=0.0, logprobs=3)
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL))
    texts = [tok.decode([t]) for t in want.token_ids]
    got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.tokens == texts and "".join(lp.tokens) == got.choices[0].text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4)
    assert lp.text_offset == [sum(map(len, texts[:i])) for i in range(len(texts))]
    for top, x in zip(lp.top_logprobs, want.logprobs):  # the 3 best, the generated one (greedy: the best) among them
        assert top == pytest.approx({tok.decode([i]): v for i, v in x.top}, abs=1e-4)
    chunks = list(api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                         stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == texts
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    plain = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(api, sdk):
    """lm-evaluation-harness's loglikelihood request: token ids, `echo`, `logprobs: 1`, greedy, one token (or none:
    `max_tokens: 0`). The prompt's tokens lead the legacy logprobs object, the first with null entries, the rest
    with the decode service's prompt log-probabilities (the gRPC SDK's, checked against transformers in
    test_client.py); plain and streamed alike."""
    ids = sdk.tokenize("import os\nimport sys\n")
    want = sdk.generate(ids, max_tokens=1, prompt_logprobs=1)
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL))
    texts = [tok.decode([t]) for t in ids]
    for max_tokens in (1, 0):
        got = api.completions.create(model="zeroc-tiny", prompt=ids, max_tokens=max_tokens, temperature=0,
                                     logprobs=1, echo=True)
        choice, lp = got.choices[0], got.choices[0].logprobs
        assert lp.tokens[: len(ids)] == texts and len(lp.tokens) == len(ids) + max_tokens
        assert choice.text == tok.decode(ids, skip_special_tokens=True) + (tok.decode(want.token_ids) * max_tokens)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1: len(ids)] == pytest.approx([x.logprob for x in want.prompt_logprobs], abs=1e-4)
        assert all(len(top) in (1, 2) for top in lp.top_logprobs[1:])  # the best, and the token where it is not
        assert got.usage.completion_tokens == max_tokens and got.usage.prompt_tokens == len(ids)
    assert choice.finish_reason == "length"
    chunks = list(api.completions.create(model="zeroc-tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=1,
                                         echo=True, stream=True))
    assert chunks[0].choices[0].text == choice.text and chunks[0].choices[0].logprobs.tokens == texts
    whole = api.completions.create(model="zeroc-tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=1, echo=True)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == \
        whole.choices[0].logprobs.tokens


def test_a_batch_of_prompts_answers_each_prompts_choices_in_order(api, sdk):
    """A completions batch (OpenAI's list of prompts, as lm-evaluation-harness sends with batch_size > 1): choice
    p * n + i is prompt p's i-th, each what the gRPC SDK generates for that prompt; the usage counts each prompt
    once; streamed chunks name their choice; with echo and logprobs each choice leads with its own prompt."""
    prompts = [PROMPT, "import os\n", "A list comprehension"]
    want = [sdk.generate(p, max_tokens=5, temperature=0.0) for p in prompts]
    got = api.completions.create(model="zeroc-tiny", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in got.choices] == list(range(6))
    assert [c.text for c in got.choices] == [w.text for w in want for _ in range(2)]
    assert got.usage.prompt_tokens == sum(w.usage.prompt_tokens for w in want)
    assert got.usage.completion_tokens == 2 * sum(len(w.token_ids) for w in want)
    chunks = list(api.completions.create(model="zeroc-tiny", prompt=prompts, max_tokens=5, temperature=0,
                                         stream=True))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert texts == [w.text for w in want]
    ids = [sdk.tokenize(p) for p in prompts]
    scored = api.completions.create(model="zeroc-tiny", prompt=ids, max_tokens=0, temperature=0, logprobs=1,
                                    echo=True)
    for choice, p in zip(scored.choices, ids):
        assert len(choice.logprobs.tokens) == len(p) and choice.logprobs.token_logprobs[0] is None
        want_lp = sdk.generate(p, max_tokens=1, prompt_logprobs=0).prompt_logprobs
        assert choice.logprobs.token_logprobs[1:] == pytest.approx([x.logprob for x in want_lp], abs=1e-4)


def test_echo_without_logprobs_and_its_errors(api):
    got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, n=2)
    plain = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert [c.text for c in got.choices] == [PROMPT + plain.choices[0].text] * 2
    chunks = list(api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         stream=True))
    assert chunks[0].choices[0].text == PROMPT and "".join(c.choices[0].text for c in chunks) == got.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


def test_chat_logprobs_and_top_logprobs_through_the_sdk(api, sdk):
    """`logprobs: true, top_logprobs: n` on /v1/chat/completions: each token's text, bytes and log-probability,
    and its n best alternatives, plain and streamed; the bytes of the tokens make up the reply's UTF-8."""
    got = api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=8, temperature=0.7, seed=3,
                                      logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == 8
    assert bytes(b for c in content for b in c.bytes).decode() == got.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and 0 >= c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
               and c.top_logprobs[0].logprob >= c.logprob for c in content)
    assert any(c.token != c.top_logprobs[0].token for c in content)  # sampled, not always the best token
    chunks = list(api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=8, temperature=0.7,
                                              seed=3, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(c.token, c.bytes) for c in content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=2, logprobs=True,
                                    top_logprobs=21)
    assert err.value.body["param"] == "top_logprobs"


def test_several_choices_are_seeded_calls_of_their_own(api, sdk):
    """`n` = 3 with a seed: choice i is what the gRPC SDK generates with seed + i, plain and streamed (each chunk
    naming its choice); the usage counts the prompt once and every choice's tokens."""
    want = [sdk.generate(PROMPT, max_tokens=6, temperature=1.0, seed=11 + i, logprobs=1) for i in range(3)]
    assert len({tuple(w.token_ids) for w in want}) > 1  # the seeds give different completions
    got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=3,
                                 logprobs=1)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert [c.logprobs.token_logprobs for c in got.choices] == [
        pytest.approx([x.logprob for x in w.logprobs], abs=1e-4) for w in want]
    assert got.usage.prompt_tokens == want[0].usage.prompt_tokens and got.usage.completion_tokens == 18
    chunks = list(api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=5, temperature=1.0,
                                              seed=5, n=3, stream=True, stream_options={"include_usage": True}))
    texts, roles, ends = {}, set(), {}
    for c in chunks[:-1]:
        choice = c.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        roles |= {choice.index} if choice.delta.role == "assistant" else set()
        ends[choice.index] = choice.finish_reason or ends.get(choice.index)
    plain = api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=5, temperature=1.0,
                                        seed=5, n=3)
    assert texts == {c.index: c.message.content for c in plain.choices} and roles == {0, 1, 2}
    assert ends == {0: "length", 1: "length", 2: "length"} and chunks[-1].usage.completion_tokens == 15


def test_penalties_and_logit_bias_reach_the_decode_services(api, sdk):
    """OpenAI's frequency and presence penalties and logit bias, and the repetition_penalty extension, give what
    the gRPC SDK gets with them (tests/zeroc/test_penalties.py checks the engine against transformers), and
    change the output."""
    plain = sdk.generate(PROMPT, max_tokens=16, temperature=0.0)
    for kwargs in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.5}, {"repetition_penalty": 1.3}):
        want = sdk.generate(PROMPT, max_tokens=16, temperature=0.0, **kwargs)
        extra = {"extra_body": kwargs} if "repetition_penalty" in kwargs else kwargs
        got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=16, temperature=0, **extra)
        assert got.choices[0].text == want.text != plain.text, kwargs
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=2, presence_penalty=2.5)
    assert err.value.body["param"] == "presence_penalty"
    banned = plain.token_ids[0]  # OpenAI's logit_bias: -100 bans the greedy first token
    got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                 logit_bias={str(banned): -100}, extra_body={"return_token_ids": True})
    assert banned not in got.choices[0].model_extra["token_ids"]
    assert got.choices[0].text == sdk.generate(PROMPT, max_tokens=16, temperature=0.0, logit_bias={banned: -100}).text


def test_min_p_stop_token_ids_and_min_tokens_reach_the_decode_services(api, sdk):
    """vLLM's min_p, stop_token_ids, min_tokens and include_stop_str_in_output: a seeded min-p request gives the
    SDK's tokens (tests/zeroc/test_sampling.py checks the distribution), a stop token id ends the text before it,
    EOS waits for min_tokens, a stop string stays in the text when asked."""
    kw = dict(max_tokens=24, temperature=1.5, seed=5)
    want = sdk.generate(PROMPT, min_p=0.3, **kw)
    got = api.completions.create(model="zeroc-tiny", prompt=PROMPT, extra_body={"min_p": 0.3}, **kw)
    assert got.choices[0].text == want.text != sdk.generate(PROMPT, **kw).text
    plain = sdk.generate(PROMPT, max_tokens=16, temperature=0.0)
    stop = plain.token_ids[3]
    cut = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                 extra_body={"stop_token_ids": [stop], "return_token_ids": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["token_ids"] == plain.token_ids[: plain.token_ids.index(stop) + 1]
    forced = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                    logit_bias={"1": 100}, extra_body={"min_tokens": 3})  # 1: </s>, at the top
    assert forced.choices[0].finish_reason == "stop" and forced.usage.completion_tokens == 4
    stop = plain.text[2:5]
    kept = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == plain.text[: plain.text.index(stop) + len(stop)]
    for bad in ({"min_p": 1.5}, {"min_tokens": 3}):  # min_tokens past max_tokens
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=2, extra_body=bad)


def test_special_tokens_text_is_kept_only_when_asked(api, sdk):
    """vLLM's `skip_special_tokens`: the EOS token, forced by logit bias past ignore_eos, adds its text only with
    false, through the gateway as through the SDK."""
    kw = dict(max_tokens=3, temperature=0, logit_bias={"1": 100})  # 1: the bundled model's </s>
    plain = api.completions.create(model="zeroc-tiny", prompt=PROMPT, extra_body={"ignore_eos": True}, **kw)
    kept = api.completions.create(model="zeroc-tiny", prompt=PROMPT, **kw,
                                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert plain.choices[0].text == "" and kept.choices[0].text == "</s>" * 3
    assert sdk.generate(PROMPT, max_tokens=3, ignore_eos=True, logit_bias={1: 100},
                        skip_special_tokens=False).text == "</s>" * 3


def test_cached_prefix_tokens_are_reported(api):
    prompt = " ".join(f"word{i}" for i in range(120))  # several KV blocks
    cached = [api.completions.create(model="zeroc-tiny", prompt=prompt, max_tokens=1, temperature=0)
              .usage.prompt_tokens_details.cached_tokens for _ in range(3)]
    assert cached[0] == 0 and max(cached[1:]) > 0


def test_models_and_health(api, gateway):
    models = api.models.list().data
    assert [m.id for m in models] == ["zeroc-tiny"] and models[0].model_extra["max_model_len"] == 2048
    import urllib.request

    with urllib.request.urlopen(f"{gateway.url}/health", timeout=30) as reply:
        health = json.loads(reply.read())
    assert reply.status == 200 and health["status"] == "ok"
    assert health["replicas"] == {t: True for t in gateway.targets}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(gateway, sdk):
    want = sdk.generate(PROMPT, max_tokens=10, temperature=0.0)
    body = json.dumps({"model": "zeroc-tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "--fail-with-body", f"{gateway.url}/v1/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [line.removeprefix("data: ") for line in out.stdout.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in out.stdout.split("\n\n") if line)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
