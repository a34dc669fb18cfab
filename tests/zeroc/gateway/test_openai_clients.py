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

from zeroc.client import Client
from zeroc.config import BUNDLED_MODEL

PROMPT = "The built-in function"
MESSAGES = [{"role": "system", "content": "You answer in Python."},
            {"role": "user", "content": "How do I read a file?"}]


@pytest.fixture(scope="module")
def api(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


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
    from transformers import AutoTokenizer

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
