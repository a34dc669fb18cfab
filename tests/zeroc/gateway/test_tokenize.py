"""vLLM's /tokenize and /detokenize on a real gateway: a prompt's and a chat's ids are what the decode service
counts of them (its usage), their text reads back, and bad bodies are 400s naming the field."""

from __future__ import annotations

import pytest

from zeroc.config import BUNDLED_MODEL
from zeroc.tokenizer import Tokenizer

PROMPT = "The built-in function"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


def test_a_prompts_and_a_chats_ids_are_what_the_decode_service_counts(gateway, api):
    status, got = gateway.post("/tokenize", {"model": "zeroc-tiny", "prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and got["count"] == len(got["tokens"]) and got["max_model_len"] == 2048
    done = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=1, temperature=0)
    assert got["count"] == done.usage.prompt_tokens
    assert got["tokens"] == Tokenizer.from_dir(BUNDLED_MODEL).encode(PROMPT)  # with BOS, as the service reads it
    assert len(got["token_strs"]) == got["count"] and "".join(got["token_strs"]).replace("Ġ", " ").endswith(PROMPT)
    status, chat = gateway.post("/tokenize", {"messages": CHAT})
    answer = api.chat.completions.create(model="zeroc-tiny", messages=CHAT, max_tokens=1, temperature=0)
    assert status == 200 and chat["count"] == answer.usage.prompt_tokens and chat["token_strs"] is None
    status, bare = gateway.post("/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert bare["tokens"] == got["tokens"][1:]
    status, text = gateway.post("/detokenize", {"model": "zeroc-tiny", "tokens": bare["tokens"]})
    assert status == 200 and text == {"prompt": PROMPT}


def test_a_chat_can_continue_its_last_message_as_the_same_prompt_would(gateway, api):
    from transformers import AutoTokenizer

    chat = CHAT + [{"role": "assistant", "content": "A list is"}]
    want = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL)).apply_chat_template(
        chat, add_generation_prompt=False, continue_final_message=True, tokenize=True, return_dict=True)["input_ids"]
    body = {"messages": chat, "add_generation_prompt": False, "continue_final_message": True}
    status, got = gateway.post("/tokenize", body)
    assert status == 200 and got["tokens"] == want
    answer = api.chat.completions.create(model="zeroc-tiny", messages=chat, max_tokens=6, temperature=0,
                                         extra_body={"add_generation_prompt": False, "continue_final_message": True})
    same = api.completions.create(model="zeroc-tiny", prompt=want, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == same.choices[0].text and answer.usage.prompt_tokens == len(want)
    status, err = gateway.post("/v1/chat/completions", {"messages": chat, "continue_final_message": True})
    assert status == 400 and err["error"]["param"] == "continue_final_message"


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("/detokenize", {"tokens": [5, 999999]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_bodies_are_400s_naming_the_field(gateway, path, body, param):
    status, got = gateway.post(path, body)
    assert status in (400, 404) and got["error"]["param"] == param, got
