"""Request bodies of the OpenAI API as the gateway accepts them, checked before anything is sent on.

Unknown fields are ignored (as OpenAI's own SDKs add new ones over time); known fields the decode
services cannot honour are accepted only at their neutral values, anything else is a 400 naming
the field. `top_k`, `repetition_penalty`, `ignore_eos`, `return_token_ids` and `structured_outputs` are
extensions, as in vLLM; `response_format`, `structured_outputs` (or vLLM's older `guided_*`) and chat's
forced tool calls become the request's guide (structured output, zeroc/structured.py). Log-probabilities
(`logprobs`, and chat's `top_logprobs`) go up to MAX_LOGPROBS alternatives, as vLLM's default allows (OpenAI's
own completions stop at 5).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zeroc.gateway.errors import APIError, quote
from zeroc.gateway.tools import ToolCalls, plan_tool_calls
from zeroc.config.limits import (MAX_GUIDE_CHARS, MAX_GUIDE_CHOICE_CHARS, MAX_GUIDE_CHOICES, MAX_LOGIT_BIAS,
                                 MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_STOP_TOKEN_IDS)

_U32 = 2**32 - 1
MAX_CHOICES = 16  # `n`: each choice is a decode call of its own
MAX_BATCH_CHOICES = 64  # completions: prompts x n, the decode calls one request may hold open at once


class _Body(BaseModel):
    # NaN / Infinity are valid Python JSON but no valid sampling parameter.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    def unsupported(self) -> list[tuple[str, object]]:
        """(field, value) of every set field the services cannot honour (`parse_body` refuses them)."""
        return []


class StreamOptions(_Body):
    include_usage: bool = False


_GuideText = Field(None, min_length=1, max_length=MAX_GUIDE_CHARS)


class JsonSchemaFormat(_Body):
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")  # JSON Schema's `true`: any JSON value
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: free text, any JSON object, or a JSON Schema's instance."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def guide(self) -> dict | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError(400, "response_format.json_schema: required with type json_schema",
                               param="response_format.json_schema")
            return {"json_schema": _schema_text(self.json_schema.schema_, "response_format.json_schema.schema")}
        return {"json_object": True} if self.type == "json_object" else None


class StructuredOutputs(_Body):
    """vLLM's structured_outputs extension: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = _GuideText
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_GUIDE_CHOICES)
    grammar: str | None = _GuideText
    json_object: bool | None = None

    def guide(self) -> dict | None:
        given = {k: v for k, v in (("json_schema", self.json_), ("regex", self.regex), ("choice", self.choice),
                                   ("grammar", self.grammar), ("json_object", self.json_object or None))
                 if v is not None}
        if len(given) != 1:
            raise APIError(400, "structured_outputs: set exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        if "json_schema" in given:
            given["json_schema"] = _schema_text(given["json_schema"], "structured_outputs.json")
        if any(not c or len(c) > MAX_GUIDE_CHOICE_CHARS for c in given.get("choice", ())):
            raise APIError(400, f"structured_outputs.choice: choices must be non-empty and at most "
                                f"{MAX_GUIDE_CHOICE_CHARS} characters", param="structured_outputs.choice")
        return given


def _schema_text(schema: dict | str | bool, param: str) -> str:
    """A JSON Schema as the JSON text the services take, at most MAX_GUIDE_CHARS. Raises APIError."""
    text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_GUIDE_CHARS:
        raise APIError(400, f"{param}: at most {MAX_GUIDE_CHARS} characters of JSON, got {len(text)}", param=param)
    return text


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str | None = Field(None, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=_U32)
    temperature: float | None = Field(None, ge=0.0, le=100.0)  # OpenAI documents [0, 2]; the service takes 100
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM's extension
    top_k: int | None = Field(None, ge=-1, le=_U32)  # -1 (vLLM's spelling) or 0: no cut
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_U32)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True  # vLLM's extension: False keeps special tokens' text
    min_tokens: int | None = Field(None, ge=0, le=_U32)  # vLLM's extensions
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # vLLM's extension: lower runs first (a priority-policy server)
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension
    guided_json: dict[str, Any] | str | None = None  # ... and its older spellings of it (before vLLM 0.11)
    guided_regex: str | None = _GuideText
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_GUIDE_CHOICES)
    guided_grammar: str | None = _GuideText
    # Known fields the services cannot honour: only their neutral values pass (see `unsupported`), so a client that
    # relies on one hears so instead of getting an answer made without it.
    best_of: int | None = None
    use_beam_search: bool = False  # vLLM's extensions, from here on
    bad_words: list[Any] | None = None
    allowed_token_ids: list[Any] | None = None
    truncate_prompt_tokens: int | None = None
    spaces_between_special_tokens: bool = True
    logits_processors: list[Any] | None = None

    def guide(self) -> dict | None:
        """The structured-output guide the SDK sends (zeroc.client.build_request's `guide`), from response_format,
        structured_outputs or the guided_* fields; None for free text. Raises APIError when more than one asks."""
        older = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")}
        older = {k: v for k, v in older.items() if v is not None}
        if len(older) > 1:
            raise APIError(400, "guided_*: set one of guided_json, guided_regex, guided_choice, guided_grammar",
                           param="guided_" + sorted(older)[-1])
        given = [g for g in (self.response_format and self.response_format.guide(),
                             self.structured_outputs and self.structured_outputs.guide(),
                             older and StructuredOutputs.model_validate(older).guide()) if g]
        if len(given) > 1:
            raise APIError(400, "structured_outputs: set one of response_format, structured_outputs and the "
                                "guided_* fields, not both", param="structured_outputs")
        return given[0] if given else None

    def bias(self) -> dict[int, float]:
        """logit_bias with its keys (token ids as JSON strings, OpenAI's shape) read as ints. Raises APIError."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or len(key) > 10:
                raise APIError(400, f"logit_bias: keys must be token ids, got {quote(key)}", param="logit_bias")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise APIError(400, f"logit_bias: biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got "
                                    f"{quote(value)}", param="logit_bias")
            out[int(key)] = value
        return out

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, f"stop: at most 16 stop strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        return stops

    def unsupported(self) -> list[tuple[str, object]]:
        """(field, value) of every set field the services cannot honour."""
        out = [("best_of", self.best_of)] if self.best_of not in (None, 1) else []
        neutral = {"use_beam_search": False, "bad_words": None, "allowed_token_ids": None,
                   "truncate_prompt_tokens": None, "spaces_between_special_tokens": True, "logits_processors": None}
        return out + [(name, getattr(self, name)) for name, value in neutral.items()
                      if getattr(self, name) not in (value, [])]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=_U32)  # 0 with echo: the prompt alone (zeroc/gateway/echo.py)
    max_completion_tokens: int | None = Field(None, ge=1, le=_U32)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    tools: list[Any] | None = None  # chat's (zeroc/gateway/tools.py); not the legacy endpoint's

    def logprobs_wanted(self) -> int | None:
        """Alternatives per token the decode service sends (None: no log-probabilities)."""
        return self.logprobs

    def prompt_only(self) -> bool:
        """Whether the answer is the prompt alone (`echo` with `max_tokens: 0`). Raises APIError for a 0 without
        echo."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens: 0 asks for no tokens, which only makes sense with echo",
                           param="max_tokens")
        return self.max_tokens == 0 and not self.max_completion_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts (each text or token ids): one, or a batch (a list of strings or of token-id lists) of at most
        MAX_BATCH_CHOICES / n."""
        p = self.prompt
        batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(batch) * (self.n or 1) > MAX_BATCH_CHOICES:
            raise APIError(400, f"prompt: {len(batch)} prompts x n={self.n or 1} choices is over the limit of "
                                f"{MAX_BATCH_CHOICES} completions a request", param="prompt")
        for one in batch:
            if isinstance(one, list) and (not one or any(not 0 <= t <= _U32 for t in one)):
                raise APIError(400, "prompt: token ids must be a non-empty list of integers >= 0", param="prompt")
            if isinstance(one, str) and not one:
                raise APIError(400, "prompt: the prompt is empty", param="prompt")
        return batch

    def unsupported(self) -> list[tuple[str, object]]:
        out = super().unsupported()
        out += [("suffix", self.suffix)] if self.suffix else []
        out += [("tools", self.tools)] if self.tools else []
        return out


class ContentPart(_Body):
    type: str = Field(..., max_length=64)
    text: str | None = None


class FunctionDef(_Body):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: any object
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str = Field(..., max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=128)  # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool's answer: to which call

    def as_template_input(self, index: int) -> dict[str, Any]:
        """{"role", "content"[, "name", "tool_calls", "tool_call_id"]} with text parts joined, as templates for text
        models expect."""
        content = self.content
        if isinstance(content, list):
            kinds = {p.type for p in content} - {"text"}
            if kinds:
                raise APIError(400, f"messages[{index}].content: only text parts are supported, got "
                                    f"{quote(sorted(kinds))}", param=f"messages.{index}.content")
            content = "\n".join(p.text or "" for p in content)
        out = {"role": self.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=_U32)
    add_generation_prompt: bool = True  # vLLM's extensions: False renders no assistant header after the messages;
    continue_final_message: bool = False  # and this, with it False, leaves the last message open for the model
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=64)  # more variables for the template

    def tool_calls(self, reply_id: str, parser: str = "") -> tuple[dict | None, ToolCalls | None]:
        """(the guide a forced tool call puts on the output, what to make of the choices' texts); (None, None) for
        free text. `parser`: the gateway's --tool-call-parser. Raises APIError (zeroc/gateway/tools.py)."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []]
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        guide, calls = plan_tool_calls(reply_id, tools, choice, self.parallel_tool_calls, parser)
        if guide is not None and self.guide() is not None:
            raise APIError(400, "tool_choice: a forced tool call guides the output; response_format or "
                                "structured_outputs cannot too", param="tool_choice")
        return guide, calls

    def logprobs_wanted(self) -> int | None:
        """Alternatives per token the decode service sends (None: no log-probabilities). Raises APIError."""
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt's token ids, or a chat's through the model's template (exactly one of the two)."""

    model: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template's own)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ToolDef] | None = Field(None, max_length=128)
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=64)
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """vLLM's /detokenize: token ids' text."""

    model: str | None = Field(None, max_length=512)
    tokens: list[Annotated[int, Field(ge=0, le=_U32)]] = Field(..., max_length=1 << 20)


def _no_constant(name: str):
    """NaN, Infinity and -Infinity: Python's json reads them, but they are not JSON, and free-form fields (a tool's
    parameters, `reasoning`) that carry them would break every answer that echoes them."""
    raise ValueError(f"{name} is not a JSON value")


def parse_body(raw: bytes, model: type[_Body]) -> _Body:
    """Parse and check a request body. Raises APIError (400) naming the field at fault."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the body is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        # JSON escapes can spell lone surrogates, which no protobuf string (UTF-8) can carry.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        raise APIError(400, "the body's strings must be valid Unicode (no lone surrogates)") from None
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    for name, value in req.unsupported():
        raise APIError(400, f"{name}: not supported by this server (got {quote(value)})", param=name)
    return req


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400: the field path and what is wrong, never the whole input."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"]) or None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {first['msg'][:200]}{more}", param=param)
