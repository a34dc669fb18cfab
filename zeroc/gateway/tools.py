"""Function calling on /v1/chat/completions, by structured output: a named `tool_choice`, or "required".

Without a parser for the model's own tool-call syntax there is no telling, in free text, whether the model called a
tool, so "auto" (the default when `tools` are given) is refused with a 400 that says what works, as vLLM refuses it
unless started with a tool-call parser. What works needs no parser, as in vLLM: the output is guided
(zeroc/structured.py) so that it *is* the call.
- A named function (`{"type": "function", "function": {"name": ...}}`): the output is an instance of that
  function's `parameters` schema, returned as the `arguments` of one tool call (`finish_reason` as generated:
  "stop", OpenAI's for a forced call).
- "required": the output is a JSON array of at least one `{"name": ..., "parameters": ...}`, each an instance of
  one of the tools (vLLM's schema), at most one with `parallel_tool_calls: false`; each becomes a tool call
  (`finish_reason` "tool_calls"). Cut short by `max_tokens`, the array cannot be read: the text comes back as the
  message's content, with `finish_reason` "length".

The `tools` go to the chat template (as Hugging Face's `apply_chat_template(tools=...)` passes them), so a model
whose template describes tools sees them. Streamed, a named call's arguments stream as they are generated (its id
and name in the first chunk); a "required" answer's calls come whole in the last chunk, once the array is complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from zeroc.gateway.errors import APIError

FREE = "none"


@dataclass
class ToolCalls:
    """What a request's tool choice makes of its choices' texts: `name` for a named function, None for
    "required"."""

    reply_id: str
    name: str | None
    _texts: dict[int, str] = field(default_factory=dict)  # "required", streamed: each choice's text so far

    @property
    def named(self) -> bool:
        return self.name is not None

    def _call(self, index: int, k: int, name: str, arguments: str) -> dict:
        digest = hashlib.sha256(f"{self.reply_id}/{index}/{k}".encode()).hexdigest()[:24]
        return {"id": f"call_{digest}", "type": "function", "function": {"name": name, "arguments": arguments}}

    def _calls(self, text: str, index: int) -> list[dict] | None:
        """The tool calls a whole text makes, None where it is not a complete answer (cut short)."""
        if self.named:
            return [self._call(index, 0, self.name, text)]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        return [self._call(index, k, it["name"], json.dumps(it["parameters"], ensure_ascii=False))
                for k, it in enumerate(items)]

    def message(self, text: str, finish: str | None, index: int) -> tuple[dict, str | None]:
        """A whole choice's message and finish reason."""
        calls = self._calls(text, index)
        if calls is None:
            return {"role": "assistant", "content": text}, finish
        return ({"role": "assistant", "content": None, "tool_calls": calls},
                finish if self.named or finish != "stop" else "tool_calls")

    def head(self, index: int) -> list[dict] | None:
        """A named call's first delta entries (its id and name), sent with the stream's role chunk."""
        if not self.named:
            return None
        call = self._call(index, 0, self.name, "")
        return [{"index": 0, **call}]

    def delta(self, text: str, finish: str | None, index: int) -> tuple[dict, str | None]:
        """A streamed choice's delta and finish reason: a named call's arguments as they come; "required"'s
        calls once its text is whole (nothing before)."""
        if self.named:
            return ({"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}), finish
        self._texts[index] = self._texts.get(index, "") + text
        if finish is None:
            return {}, None
        whole = self._texts.pop(index)
        calls = self._calls(whole, index)
        if calls is None:
            return ({"content": whole} if whole else {}), finish
        return ({"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]},
                "tool_calls" if finish == "stop" else finish)


def tool_guide(tools: list[dict], choice: str | dict | None, parallel: bool) -> tuple[dict | None, str | None]:
    """(the guide the SDK sends, the named function) of a request's tools and tool_choice; (None, None) where the
    output stays free text. Raises APIError (400) for a choice the server cannot honour or that names no tool."""
    if not tools:
        if choice not in (None, FREE):
            raise APIError(400, "tool_choice: only allowed when tools are given", param="tool_choice")
        return None, None
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if len(by_name) != len(tools):
        raise APIError(400, "tools: function names must be unique", param="tools")
    if choice == FREE:
        return None, None
    if choice in (None, "auto"):
        raise APIError(400, 'tool_choice: "auto" (the default with tools) needs a parser of this model\'s tool-call '
                            'syntax, which this server does not have; use "required" or name a function',
                       param="tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in by_name:
            raise APIError(400, f"tool_choice: no tool is named {name[:64]!r}", param="tool_choice")
        return {"json_schema": json.dumps(by_name[name])}, name
    one_of = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
               "properties": {"name": {"const": name}, "parameters": params}} for name, params in by_name.items()]
    array = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        array["maxItems"] = 1
    return {"json_schema": json.dumps(array)}, None
