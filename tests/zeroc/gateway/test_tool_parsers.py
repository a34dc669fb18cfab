"""The tool-call syntaxes of tool_choice "auto" (zeroc/gateway/tool_parsers.py): each parser on texts with and without
calls, and a streamed answer, cut anywhere, adding up to the whole answer's content and calls."""

from __future__ import annotations

import json
import random

import pytest

from zeroc.gateway.tool_parsers import PARSERS
from zeroc.gateway.tools import ToolCalls

CALL = '{"name": "get_weather", "arguments": {"city": "Paris; France", "unit": "C"}}'
TEXTS = {  # parser -> [(text, (content, [(name, arguments)]) or None for plain content)]
    "hermes": [
        (f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>",
         ("Let me check.", [("get_weather", '{"city": "Paris; France", "unit": "C"}')])),
        (f"<tool_call>{CALL}</tool_call><tool_call>{{\"name\": \"now\", \"arguments\": {{}}}}</tool_call>",
         ("", [("get_weather", '{"city": "Paris; France", "unit": "C"}'), ("now", "{}")])),
        (f"<tool_call>{CALL}", ("", [("get_weather", '{"city": "Paris; France", "unit": "C"}')])),  # no end tag
        ("It is sunny. No <tool here.", None),
        ("<tool_call>{not json}</tool_call>", None),
        ('<tool_call>{"arguments": {}}</tool_call>', None),  # no name
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris; France"}}',
         ("", [("get_weather", '{"city": "Paris; France"}')])),
        ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
         ("", [("a", "{}"), ("b", '{"x": 1}')])),
        ("  The answer is 4.", None),
        ('{"name": 3}', None),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris; France"}}, {"name": "now", '
         '"arguments": {}}]', ("", [("get_weather", '{"city": "Paris; France"}'), ("now", "{}")])),  # before v11
        ('Sure.\n[TOOL_CALLS]get_weather{"city": "Paris; France"}[TOOL_CALLS]now{}',
         ("Sure.", [("get_weather", '{"city": "Paris; France"}'), ("now", "{}")])),  # v11
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "[TOOL_CALLS] in a string"}',
         None),  # the marker inside an argument splits it: no call that parses, plain content
        ('[TOOL_CALLS]get_weather[ARGS]{"unit": "C"}', ("", [("get_weather", '{"unit": "C"}')])),  # v13
        ("It is [TOOL_CALLS] not json", None),
        ("No call [TOOL here.", None),
    ],
    "pythonic": [
        ('[get_weather(city="Paris; France", unit="C"), now()]',
         ("", [("get_weather", '{"city": "Paris; France", "unit": "C"}'), ("now", "{}")])),
        (' [search(query="a, b]", limit=3, exact=True, tags=["x", None], where={"lat": 1.5})]',
         ("", [("search", '{"query": "a, b]", "limit": 3, "exact": true, "tags": ["x", null], '
                          '"where": {"lat": 1.5}}')])),
        ("[1, 2, 3]", None),  # a list, but of no calls
        ('[os.system("rm -rf /")]', None),  # not a plain name: never a call, never evaluated
        ("[f(x)]", None),  # a positional argument
        ("[f(x=open('/etc/passwd'))]", None),  # an argument that is no literal
        ("[f(x={1, 2})]", None),  # a literal JSON cannot hold
        ("Sure: [f(x=1)]", None),  # not the whole answer
        ("[" * 5000 + "]" * 5000, None),  # nested past the parser's limit
    ],
}
CASES = [(name, text, want) for name, texts in TEXTS.items() for text, want in texts]


@pytest.mark.parametrize("name, text, want", CASES)
def test_each_parser_reads_the_calls_or_leaves_the_text(name, text, want):
    parsed = PARSERS[name].parse(text)
    assert parsed == (None if want is None else (want[0], want[1]))
    message, finish = ToolCalls("chatcmpl-1", None, PARSERS[name]).message(text, "stop", 0)
    if want is None:
        assert message == {"role": "assistant", "content": text} and finish == "stop"
    else:
        assert message["content"] == (want[0] or None) and finish == "tool_calls"
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == want[1]
        assert len({c["id"] for c in message["tool_calls"]}) == len(want[1])


@pytest.mark.parametrize("name, text, want", CASES)
def test_a_stream_cut_anywhere_adds_up_to_the_whole_answer(name, text, want):
    rnd = random.Random(len(text))
    whole, _ = ToolCalls("chatcmpl-1", None, PARSERS[name]).message(text, "stop", 0)
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        calls = ToolCalls("chatcmpl-1", None, PARSERS[name])
        deltas = [calls.delta(p, None, 0) for p in pieces] + [calls.delta("", "stop", 0)]
        content = "".join(d.get("content", "") for d, _ in deltas)
        streamed = [c for d, _ in deltas for c in d.get("tool_calls", [])]
        assert all(f is None for _, f in deltas[:-1]) and deltas[-1][1] == ("stop" if want is None else "tool_calls")
        assert content == (whole["content"] or "")
        assert [(c["id"], c["function"]) for c in streamed] == [(c["id"], c["function"])
                                                               for c in whole.get("tool_calls", [])]
        if want is not None and name != "llama3_json":  # no part of the call's syntax ever went out as content
            assert "<tool" not in content and "[TOOL" not in content


def test_arguments_keep_their_json():
    [(name, arguments)] = PARSERS["hermes"].parse(f"<tool_call>{CALL}</tool_call>")[1]
    assert json.loads(arguments) == {"city": "Paris; France", "unit": "C"}
