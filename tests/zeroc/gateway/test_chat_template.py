"""Chat templates rendered as Hugging Face renders them, and kept when a model directory is saved again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from zeroc.config import BUNDLED_MODEL, ConfigError
from zeroc.gateway.chat import load_chat_template
from zeroc.gateway.errors import APIError
from zeroc.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "A sequence."}, {"role": "user", "content": "And a tuple? {{ 7*7 }}"}],
]
# A template in the style of real chat models: loop controls, raise_exception, tojson, named templates.
STRICT = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
          "{{ raise_exception('system only first') }}{% endif %}<|{{ m['role'] }}|>{{ m['content'] | tojson }}"
          "{% if loop.index > 8 %}{% break %}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_bundled_template_renders_as_transformers_does(messages, add_generation_prompt):
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL)).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert load_chat_template(BUNDLED_MODEL).render(messages, add_generation_prompt) == want
    if any("{{" in m["content"] for m in messages):
        assert "{{ 7*7 }}" in want  # user text is data, never evaluated as a template


@pytest.mark.parametrize("source", [None, STRICT, "{% for m in messages %}[{{ m['content'] | trim }}]{% endfor %}"])
def test_continuing_the_last_message_cuts_the_text_where_transformers_does(tmp_path, source):
    """The bundled template (which ends a message with blank lines), one that quotes it (tojson) and one that
    trims it: the text ends where the last message's own text does."""
    from transformers import AutoTokenizer

    shutil.copy(BUNDLED_MODEL / "tokenizer.json", tmp_path)
    cfg = json.loads((BUNDLED_MODEL / "tokenizer_config.json").read_text())
    cfg["chat_template"] = source or cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    chat = CHATS[1][:3] + [{"role": "assistant", "content": "A tuple is "}]
    want = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    got = load_chat_template(tmp_path).render(chat, add_generation_prompt=False, continue_final=True)
    assert got == want and got.rstrip().endswith(("A tuple is", '"A tuple is'))
    with pytest.raises(APIError, match="add_generation_prompt to false"):
        load_chat_template(tmp_path).render(chat, continue_final=True)


def test_a_template_that_drops_the_last_message_has_nothing_to_continue(tmp_path):
    shutil.copy(BUNDLED_MODEL / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    with pytest.raises(APIError) as err:
        load_chat_template(tmp_path).render(CHATS[1], add_generation_prompt=False, continue_final=True)
    assert err.value.status == 400 and err.value.param == "continue_final_message"


def test_named_templates_loop_controls_and_raise_exception(tmp_path):
    from transformers import AutoTokenizer

    shutil.copy(BUNDLED_MODEL / "tokenizer.json", tmp_path)
    cfg = json.loads((BUNDLED_MODEL / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": STRICT}, {"name": "tool_use", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = load_chat_template(tmp_path)
    want = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(CHATS[0], tokenize=False,
                                                                           add_generation_prompt=True)
    assert template.render(CHATS[0]) == want
    with pytest.raises(APIError) as err:
        template.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    assert err.value.status == 400 and "system only first" in err.value.message


def test_no_template_broken_template_and_save_round_trip(tmp_path):
    shutil.copy(BUNDLED_MODEL / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ConfigError, match="chat_template"):
        load_chat_template(tmp_path)
    out = tmp_path / "saved"
    out.mkdir()
    Tokenizer.from_dir(BUNDLED_MODEL).save(out)  # as calibrate's save_model does
    messages = CHATS[1]
    assert load_chat_template(out).render(messages) == load_chat_template(BUNDLED_MODEL).render(messages)


def test_gateway_user_errors_are_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "ZEROC_GATEWAY_PORT": "0"}
    for args, words in ((["--model", str(tmp_path)], "config.json"), (["--target", "nohost"], "HOST:PORT")):
        r = subprocess.run([sys.executable, "-m", "zeroc.cli", "serve", "gateway", *args], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("zeroc: error:") and words in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0
