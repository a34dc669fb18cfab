"""Function calling on /v1/chat/completions: a named `tool_choice` or "required" by structured output; "auto" by
the model's own syntax.

- "auto" (the default when `tools` are given): the model writes free text and calls a tool, or not, in the syntax
  its chat template taught it; the gateway reads the calls out of the text with the parser it was started with
  (`--tool-call-parser`, zeroc/gateway/tool_parsers.py), as vLLM does. Without one, there is no telling a call from
  text, so "auto" is refused with a 400 that says what works, as vLLM refuses it. Streamed, the text before the
  calls streams as content and the calls come whole in the last chunk.
What follows needs no parser, as in vLLM: the output is guided (zeroc/structured.py) so that it *is* the call.
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
from zeroc.gateway.tool_parsers import PARSERS, Parser

FREE = "none"


@dataclass
class ToolCalls:
    """What a request's tool choice makes of its choices' texts: `name` for a named function, `parser` for "auto",
    neither for "required"."""

    reply_id: str
    name: str | None
    parser: Parser | None = None
    _texts: dict[int, str] = field(default_factory=dict)  # streamed, but a named call: each choice's text so far
    _sent: dict[int, int] = field(default_factory=dict)  # "auto", streamed: characters of it sent as content

    @property
    def named(self) -> bool:
        return self.name is not None

    def _call(self, index: int, k: int, name: str, arguments: str) -> dict:
        digest = hashlib.sha256(f"{self.reply_id}/{index}/{k}".encode()).hexdigest()[:24]
        return {"id": f"call_{digest}", "type": "function", "function": {"name": name, "arguments": arguments}}

    def _calls(self, text: str, index: int) -> tuple[str | None, list[dict]] | None:
        """(the content beside them, the tool calls) a whole text makes; None where it makes none (no call in an
        "auto" answer, or an array cut short)."""
        if self.named:
            return None, [self._call(index, 0, self.name, text)]
        if self.parser is not None:
            parsed = self.parser.parse(text)
            if parsed is None:
                return None
            return parsed[0] or None, [self._call(index, k, n, a) for k, (n, a) in enumerate(parsed[1])]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        return None, [self._call(index, k, it["name"], json.dumps(it["parameters"], ensure_ascii=False))
                      for k, it in enumerate(items)]

    def message(self, text: str, finish: str | None, index: int) -> tuple[dict, str | None]:
        """A whole choice's message and finish reason."""
        got = self._calls(text, index)
        if got is None:
            return {"role": "assistant", "content": text}, finish
        return ({"role": "assistant", "content": got[0], "tool_calls": got[1]},
                finish if self.named or finish != "stop" else "tool_calls")

    def head(self, index: int) -> list[dict] | None:
        """A named call's first delta entries (its id and name), sent with the stream's role chunk."""
        if not self.named:
            return None
        call = self._call(index, 0, self.name, "")
        return [{"index": 0, **call}]

    def delta(self, text: str, finish: str | None, index: int) -> tuple[dict, str | None]:
        """A streamed choice's delta and finish reason: a named call's arguments as they come; "auto"'s content as
        far as it is surely content; the calls once the text is whole."""
        if self.named:
            return ({"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}), finish
        whole, sent = self._texts.get(index, "") + text, self._sent.get(index, 0)
        self._texts[index] = whole
        if finish is None:
            safe = self.parser.split(whole)[0] if self.parser is not None else 0
            self._sent[index] = max(sent, safe)
            return ({"content": whole[sent:safe]} if safe > sent else {}), None
        del self._texts[index]
        self._sent.pop(index, None)
        got = self._calls(whole, index)
        if got is None:
            return ({"content": whole[sent:]} if len(whole) > sent else {}), finish
        return ({"tool_calls": [{"index": k, **c} for k, c in enumerate(got[1])]},
                "tool_calls" if finish == "stop" else finish)


def plan_tool_calls(reply_id: str, tools: list[dict], choice: str | dict | None, parallel: bool,
                    parser: str = "") -> tuple[dict | None, ToolCalls | None]:
    """(the guide the SDK sends, what to make of the choices' texts) for a request's tools and tool_choice, with
    the gateway's `--tool-call-parser` (""; none); (None, None) where the output is free text. Raises APIError (400)
    for a choice the server cannot honour or that names no tool."""
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
        if not parser:
            raise APIError(400, 'tool_choice: "auto" (the default with tools) needs a parser of this model\'s '
                                'tool-call syntax (the gateway\'s --tool-call-parser), which this server was not '
                                'given; use "required" or name a function', param="tool_choice")
        return None, ToolCalls(reply_id, None, PARSERS[parser])
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in by_name:
            raise APIError(400, f"tool_choice: no tool is named {name[:64]!r}", param="tool_choice")
        return {"json_schema": json.dumps(by_name[name])}, ToolCalls(reply_id, name)
    one_of = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
               "properties": {"name": {"const": name}, "parameters": params}} for name, params in by_name.items()]
    array = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        array["maxItems"] = 1
    return {"json_schema": json.dumps(array)}, ToolCalls(reply_id, None)
