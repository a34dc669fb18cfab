"""OpenAI's Responses API (`POST /v1/responses`) as an adapter over chat completions.

A request is read into the chat request it means (`chat_request`): `instructions` become the first system message,
`input` (a string, or a list of message, function_call and function_call_output items) the messages, flat function
tools chat's nested ones, `text.format` the `response_format`, `max_output_tokens` the token limit. From there it
runs chat's path unchanged (the template, guides, tool-call and reasoning parsers, one decode call), and its chat
answer is shaped back: `ResponseShape.whole` for a whole answer, `ResponseEvents` for a stream, which turns each
chat delta into the Responses events (`response.created` ... `response.output_text.delta` ...
`response.completed`, each with its `sequence_number`).

With `store` (the default) a finished response is kept in the gateway's memory (zeroc/gateway/response_store.py),
where `previous_response_id` continues its conversation (its history and output, then the new input; not its
instructions, as OpenAI's) and `/v1/responses/{id}` reads or deletes it. Conversation objects (`conversation`),
`item_reference` inputs and `background` are a 400. Only function tools exist here (hosted tools are a 400) and
only text (images and files are a 400).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any, Callable, Literal

from pydantic import Field, ValidationError

from zeroc.client import Usage
from zeroc.gateway.errors import APIError, quote
from zeroc.gateway.schemas import _U32, ChatRequest, _Body, validation_error
from zeroc.config.limits import MAX_LOGPROBS

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_TEXT_PARTS = {"input_text", "output_text", "text"}
_REFERENCES = "items are not kept apart from their responses; continue with previous_response_id"


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None  # a hint for OpenAI's models; nothing here reads it


class ResponsesRequest(_Body):
    model: str | None = Field(None, max_length=512)
    input: str | list[dict[str, Any]] = Field(..., min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=_U32)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include: list[str] | None = Field(None, max_length=16)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None  # effort and summary: accepted, not acted on (docs/gateway.md)
    stream: bool = False
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # vLLM's extension, as on chat
    store: bool = True  # kept for previous_response_id, where the gateway keeps responses
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=512)
    truncation: Literal["disabled", "auto"] | None = None
    previous_response_id: str | None = Field(None, max_length=128)
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, object]]:
        out = [(name, getattr(self, name)) for name in ("conversation", "prompt") if getattr(self, name) is not None]
        out += [("background", True)] if self.background else []
        return out + ([("truncation", "auto")] if self.truncation == "auto" else [])

    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ()) or bool(self.top_logprobs)


def input_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` as a list of items (a string is one user message), message contents as lists of parts."""
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    out = []
    for item in given:
        if item.get("type", "message") == "message":
            item = {**item, "type": "message"}  # listed with its type, as OpenAI lists items
            if isinstance(item.get("content"), str):
                kind = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": kind, "text": item["content"]}]
        out.append(item)
    return out


def unique_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`items` (a conversation) where no two share an id; a 400 otherwise, as OpenAI's (an input that repeats a
    continued response's output would show the model that turn twice, and page `input_items` in circles)."""
    seen: set[str] = set()
    for item in items:
        item_id = item.get("id")
        if isinstance(item_id, str):
            if item_id in seen:
                raise APIError(400, f"input: the conversation holds two items with the id {quote(item_id, 64)}",
                               param="input")
            seen.add(item_id)
    return items


def listed_items(items: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    """Items as `/v1/responses/{id}/input_items` lists them: each with an id (its own, else one made from the
    response's id and its place)."""
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
    return [item if isinstance(item.get("id"), str) else
            {"id": _item_id(prefix.get(item.get("type", "message"), "item"), f"{response_id}/input", i), **item}
            for i, item in enumerate(items)]


def chat_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> ChatRequest:
    """The chat request a Responses request means, `items` its conversation (earlier turns' items, then its
    `input`'s). Raises APIError (400) naming the Responses field at fault."""
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + _messages(items)
    body: dict[str, Any] = {"messages": messages, "max_completion_tokens": req.max_output_tokens,
                            "temperature": req.temperature, "top_p": req.top_p, "stream": req.stream,
                            "parallel_tool_calls": req.parallel_tool_calls, "user": req.user,
                            "priority": req.priority}
    if req.logprobs():
        body.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    if req.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name or "response", "description": fmt.description,
                                                   "schema": True if fmt.schema_ is None else fmt.schema_,
                                                   "strict": fmt.strict}}
    try:
        return ChatRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise validation_error(exc) from None


_CHAT_FIELDS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


def as_responses_error(exc: APIError) -> APIError:
    """A 4xx of the chat path (its validation, template, guides) naming the Responses field at fault: chat's
    `messages.*` is the `input` (whose items do not map one to one: function calls join a message),
    `tools.N.function.name` is `tools.N.name`."""
    old = exc.param
    if not old or exc.status >= 500:
        return exc
    head, _, rest = old.partition(".")
    new = "input" if head == "messages" else (_CHAT_FIELDS.get(head, head) + (f".{rest}" if rest else ""))
    new = re.sub(r"^tools\.(\d+)\.function\.", r"tools.\1.", new)
    message = new + exc.message[len(old):] if exc.message.startswith(old) else exc.message
    return APIError(exc.status, message, exc.type, new, exc.code)


def _messages(given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from input items: a function call joins the assistant message before it (as chat templates
    expect one assistant turn holding its calls); reasoning items are left out, as templates leave out past
    thinking."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"input[{i}].role: must be user, assistant, system or developer, got "
                                    f"{quote(role)}", param=f"input.{i}.role")
            out.append({"role": role, "content": _text(item.get("content"), f"input.{i}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", i), "type": "function",
                    "function": {"name": _string(item, "name", i), "arguments": _string(item, "arguments", i)}}
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1]["tool_calls"] = [*out[-1].get("tool_calls", []), call]
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", i),
                        "content": _text(item.get("output"), f"input.{i}.output")})
        elif kind != "reasoning":
            why = _REFERENCES if kind == "item_reference" else "only message, function_call, function_call_output " \
                                                               "and reasoning items are supported"
            raise APIError(400, f"input[{i}].type: {why}, got {quote(kind)}", param=f"input.{i}.type")
    if not out:
        raise APIError(400, "input: no message to answer", param="input")
    return out


def _string(item: dict, key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"input[{i}].{key}: a string is required", param=f"input.{i}.{key}")
    return value


def _text(content: Any, param: str) -> str:
    """A message's text: a string, or its text parts joined (images, files and audio are a 400)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{param}: a string or a list of text parts is required", param=param)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"{param}: only text parts are supported, got {quote(kind)}", param=param)
        texts.append(part["text"])
    return "\n".join(texts)


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A flat Responses function tool as chat's nested one; hosted tools are a 400."""
    if tool.get("type") != "function":
        raise APIError(400, f"tools[{i}].type: only function tools are supported, got {quote(tool.get('type'))}",
                       param=f"tools.{i}.type")
    fields = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in fields if tool.get(k) is not None}}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise APIError(400, f"tool_choice: a mode or {{\"type\": \"function\", \"name\": ...}}, got {quote(choice)}",
                       param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def usage_of(u: Usage, reasoning_tokens: int) -> dict:
    """Responses' usage: the prompt tokens computed here are those written to the cache (the KV store keeps their
    full blocks for later prompts)."""
    details = {"cached_tokens": u.cached_prefix_tokens, "cache_write_tokens": u.prompt_tokens - u.cached_prefix_tokens}
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": details, "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, u.completion_tokens)},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _item_id(prefix: str, response_id: str, index: int) -> str:
    """Output item `index`'s id: the same in the stream's events and in its final response."""
    return f"{prefix}_{hashlib.sha256(f'{response_id}/{index}'.encode()).hexdigest()[:24]}"


class ResponseShape:
    """One request's Response objects: its settings echoed, its output from a chat answer; `keep` is handed each
    finished one (completed or cut short) where the response is stored. `count_tokens`: a text's tokens, for the
    usage's reasoning tokens (its reasoning items' text, tokenized again)."""

    def __init__(self, req: ResponsesRequest, model: str, created: int, keep: Callable[[dict], Any] | None = None,
                 count_tokens: Callable[[str], int] = lambda text: 0):
        self.keep, self.count_tokens = keep, count_tokens
        self.id, self.created = f"resp_{uuid.uuid4().hex}", created
        tools = req.tools or []
        fmt = req.text.format if req.text is not None and req.text.format is not None else TextFormat(type="text")
        self.settings = {
            "model": model, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "top_logprobs": req.top_logprobs or 0,
            "tools": tools, "tool_choice": req.tool_choice or ("auto" if tools else "none"),
            "parallel_tool_calls": req.parallel_tool_calls, "metadata": req.metadata or {},
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)}, "truncation": "disabled",
            "store": keep is not None, "background": False, "reasoning": req.reasoning, "user": req.user,
            "previous_response_id": req.previous_response_id}
        self.logprobs = req.logprobs()

    def response(self, status: str, output: list[dict], usage: Usage | None = None,
                 error: APIError | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        reasoning = sum(self.count_tokens(item["content"][0]["text"]) for item in output
                        if item["type"] == "reasoning") if usage is not None else 0
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None if error is None else {"code": _error_code(error), "message": error.message},
                "incomplete_details": incomplete, "output": output,
                "usage": None if usage is None else usage_of(usage, reasoning), **self.settings}

    def whole(self, completion: dict, usage: Usage) -> dict:
        """The Response of a whole chat completion (one choice)."""
        choice = completion["choices"][0]
        message, finish = choice["message"], choice["finish_reason"]
        status = "incomplete" if finish == "length" else "completed"
        output = []
        if message.get("reasoning_content"):
            output.append(self.reasoning_item(len(output), message["reasoning_content"], "completed"))
        calls = message.get("tool_calls") or []
        if message.get("content") or not (calls or output):  # an answer of nothing is an empty message
            entries = (choice.get("logprobs") or {}).get("content") or []
            output.append(self.message_item(len(output), message.get("content") or "", status, entries))
        for c in calls:
            output.append(self.call_item(len(output), c["id"], c["function"]["name"], c["function"]["arguments"],
                                         status))  # cut by max_output_tokens: its arguments may be too
        return self.finished(self.response(status, output, usage))

    def finished(self, response: dict) -> dict:
        if self.keep is not None:
            self.keep(response)
        return response

    def reasoning_item(self, index: int, text: str, status: str) -> dict:
        """Output item `index`: the model's thinking (its reasoning parser's), whole, in `content`."""
        return {"id": _item_id("rs", self.id, index), "type": "reasoning", "summary": [],
                "content": [{"type": "reasoning_text", "text": text}], "status": status}

    def message_item(self, index: int, text: str, status: str, entries: list[dict]) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": entries if self.logprobs else []}
        return {"id": _item_id("msg", self.id, index), "type": "message", "role": "assistant",
                "status": status, "content": [part]}

    def call_item(self, index: int, call_id: str, name: str, arguments: str, status: str) -> dict:
        return {"id": _item_id("fc", self.id, index), "type": "function_call", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}


def _error_code(error: APIError) -> str:
    return {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(error.status, "server_error")


def event(kind: str, sequence: int, **fields) -> bytes:
    """One server-sent event of a Responses stream: its type as the `event:` line too, as OpenAI sends it."""
    body = json.dumps({"type": kind, "sequence_number": sequence, **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {body}\n\n".encode()
