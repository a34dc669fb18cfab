"""A model directory's chat template, rendered as Hugging Face's `apply_chat_template` renders it.

The template is tokenizer_config.json's `chat_template` (a string, or a list of named templates of
which "default" is used) or a chat_template.jinja file beside it. It runs in jinja2's immutable
sandbox with HF's settings (trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`) and the tokenizer's special tokens as variables; the rendered
text already holds the special tokens it wants, so it is tokenized without adding any (as HF does).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zeroc.config import ConfigError
from zeroc.gateway.errors import APIError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # marks where the last message's text ends (Hugging Face's tag)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token(value: object) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} objects, as transformers writes them
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               extra: dict | None = None, continue_final: bool = False) -> str:
        """The prompt text for `messages` (and `tools`, OpenAI's shape, for templates that describe them). `extra`:
        the request's `chat_template_kwargs`, more variables for the template (Qwen3's `enable_thinking`), which may
        not replace the ones above. `continue_final`: the text ends inside the last message, which the model goes
        on writing (vLLM's `continue_final_message`, as Hugging Face cuts it: after the message's own text). A
        template that fails on them is the request's fault: a 400."""
        if continue_final:
            if add_generation_prompt:
                raise APIError(400, "continue_final_message: set add_generation_prompt to false with it (the model "
                                    "continues the last message instead of starting a new one)",
                               param="continue_final_message")
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_TAG}]
        given = dict(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
                     documents=None, **self.special_tokens)
        clash = sorted(set(extra or ()) & set(given))
        if clash:
            raise APIError(400, f"chat_template_kwargs: {clash[0][:64]!r} is set by the server",
                           param="chat_template_kwargs")
        try:
            text = self.template.render(**(extra or {}), **given)
        except Exception as exc:  # raise_exception, sandbox SecurityError, type errors on odd content
            raise APIError(400, f"messages: the chat template cannot render them ({str(exc)[:120]})",
                           param="messages") from None
        return _cut_at_tag(text) if continue_final else text


def _cut_at_tag(text: str) -> str:
    """The rendered text up to where the last message's own text ended (marked by _CONTINUE_TAG), less the spacing
    a template trimmed off that message."""
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise APIError(400, "continue_final_message: the chat template does not render the last message's text "
                            "whole, so there is nothing to continue", param="continue_final_message")
    return text[:at] if text[at: at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The directory's chat template, or None if it has none. Raises ConfigError on a broken one."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    try:
        raw = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except ValueError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON ({exc})") from None
    source = raw.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = model_dir / "chat_template.jinja"
    if source is None and jinja_file.is_file():
        source = jinja_file.read_text()
    if source is None:
        return None
    if not isinstance(source, str):
        raise ConfigError(f"{cfg_path}: chat_template must be a string or a list of named templates")
    special = {name: tok for name in _SPECIAL if (tok := _token(raw.get(name))) is not None}
    try:
        return ChatTemplate(source, special)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"{cfg_path}: chat_template line {exc.lineno}: {exc.message}") from None
