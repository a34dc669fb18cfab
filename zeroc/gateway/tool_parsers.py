"""Parsers of a model's own tool-call syntax, for `tool_choice: "auto"` (zeroc/gateway/tools.py).

With "auto" the model writes free text and decides itself whether to call a tool, in the syntax its chat template
taught it; the gateway (`--tool-call-parser`, as vLLM's flag of the same name) reads the calls out of the text. One
class per syntax, in PARSERS:
- `hermes` (Hermes 2/3, Qwen 2.5/3 and others): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks,
  after any text, which becomes the message's content.
- `llama3_json` (Llama 3.1-3.3's JSON tool calling): the whole answer is `{"name": ..., "parameters": {...}}`, or
  several separated by ";", optionally after `<|python_tag|>`.
- `mistral` (Mistral's instruct models): `[TOOL_CALLS]` after any content, then a JSON array of `{"name", "arguments"}`
  (tokenizers before v11) or `name{...}` per `[TOOL_CALLS]` (v11 on; `name[ARGS]{...}` in v13). Those markers are
  special tokens, which the decode service leaves out of the text unless asked: the gateway asks (the request's
  `skip_special_tokens` false), as vLLM does.
- `pythonic` (Llama 3.2, Llama 4): the whole answer is a Python list of calls, `[get_weather(city="Paris")]`.
A text whose calls do not parse is plain content: a model may mention the syntax without calling anything.

Streamed, `split` says how much of the text so far is surely content (sent at once) and where calls begin (held
from there, parsed once the text is whole).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import ClassVar

Call = tuple[str, str]  # (function name, arguments as JSON text)


def _call(obj: object, arguments_key: str) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def marker_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (to hold back while streaming)."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-n:])), 0)


@dataclass(frozen=True)
class _Marked:
    """A syntax whose calls follow a marker, after any content."""

    start: str
    keeps_special_tokens: ClassVar[bool] = False  # its markers are special tokens, which the text must keep

    def split(self, text: str) -> tuple[int, bool]:
        """(characters of `text` that are surely content, whether calls begin after them). Trailing whitespace is
        held too: before a call it is not content."""
        at = text.find(self.start)
        if at >= 0:
            return len(text[:at].rstrip()), True
        return len(text[: len(text) - marker_prefix(text, self.start)].rstrip()), False


@dataclass(frozen=True)
class Hermes(_Marked):
    start: str = "<tool_call>"
    end: str = "</tool_call>"

    def parse(self, text: str) -> tuple[str, list[Call]] | None:
        """(the content before the calls, the calls); None where the text holds no call that parses."""
        at = text.find(self.start)
        if at < 0:
            return None
        blocks = re.findall(re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + r"|$)", text[at:], re.S)
        try:
            calls = [_call(json.loads(b), "arguments") for b in blocks]
        except ValueError:
            return None
        return (text[:at].rstrip(), calls) if calls and None not in calls else None


# from v11: name{...}; v13: name[ARGS]{...}
_NAMED = re.compile(r"([A-Za-z0-9_.:-]{1,256})\s*(?:\[ARGS\])?\s*(\{.*\})", re.S)


@dataclass(frozen=True)
class Mistral(_Marked):
    """`[TOOL_CALLS]`, then a JSON array of {"name", "arguments"} (tokenizers before v11: Mistral-7B-Instruct-v0.3),
    or from v11 on `name{arguments}` after each `[TOOL_CALLS]` (`name[ARGS]{arguments}` in v13)."""

    start: str = "[TOOL_CALLS]"
    keeps_special_tokens: ClassVar[bool] = True

    def parse(self, text: str) -> tuple[str, list[Call]] | None:
        at = text.find(self.start)
        if at < 0:
            return None
        try:
            calls = [c for piece in text[at:].split(self.start) if piece.strip() for c in self._calls(piece.strip())]
        except ValueError:
            return None
        return (text[:at].rstrip(), calls) if calls and None not in calls else None

    @staticmethod
    def _calls(piece: str) -> list[Call | None]:
        """One marker's calls. Raises ValueError where they do not parse."""
        if piece.startswith("["):
            items = json.loads(piece)
            return [_call(obj, "arguments") for obj in items] if isinstance(items, list) else [None]
        named = _NAMED.fullmatch(piece)
        if named is None:
            raise ValueError(f"not a call: {piece[:40]!r}")
        return [_call({"name": named[1], "arguments": json.loads(named[2])}, "arguments")]


@dataclass(frozen=True)
class Llama3Json:
    tag: str = "<|python_tag|>"
    keeps_special_tokens: ClassVar[bool] = False  # the tag is special, dropped from the text: read without it

    def parse(self, text: str) -> tuple[str, list[Call]] | None:
        body = text.strip()
        body = body[len(self.tag):].strip() if body.startswith(self.tag) else body
        calls, at, decoder = [], 0, json.JSONDecoder()
        try:
            while at < len(body):  # objects separated by ";" (which a JSON string may hold too: decoded, not split)
                obj, at = decoder.raw_decode(body, at)
                calls.append(_call(obj, "parameters"))
                at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        except ValueError:
            return None
        return ("", calls) if calls and None not in calls else None

    def split(self, text: str) -> tuple[int, bool]:
        head = text.lstrip()
        if not head or (self.tag.startswith(head) and head != self.tag):
            return 0, False  # undecided: whitespace, or the start of the tag
        return (0, True) if head.startswith(("{", self.tag)) else (len(text), False)


@dataclass(frozen=True)
class Pythonic:
    """A Python list of calls with keyword arguments, `[get_weather(city="Paris"), now()]` (Llama 3.2 and 4), the
    whole answer. Read with `ast.parse` (nothing is evaluated): each argument must be a literal (strings, numbers,
    booleans, None, lists, dicts), which becomes JSON."""

    keeps_special_tokens: ClassVar[bool] = False  # Llama 4's <|python_start|> is special, dropped: read without it

    def parse(self, text: str) -> tuple[str, list[Call]] | None:
        body = text.strip()
        if not (body.startswith("[") and body.endswith("]")):
            return None
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return None
            calls = [self._call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return None
        return ("", calls) if None not in calls else None

    @staticmethod
    def _call(node: ast.expr) -> Call | None:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        if any(k.arg is None for k in node.keywords):  # **kwargs
            return None
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return node.func.id, json.dumps(args, ensure_ascii=False)  # TypeError: a literal JSON cannot hold (a set)

    def split(self, text: str) -> tuple[int, bool]:
        head = text.lstrip()
        if not head:
            return 0, False  # undecided
        return (0, True) if head.startswith("[") else (len(text), False)


Parser = Hermes | Llama3Json | Mistral | Pythonic
PARSERS: dict[str, Parser] = {"hermes": Hermes(), "llama3_json": Llama3Json(), "mistral": Mistral(),
                              "pythonic": Pythonic()}
