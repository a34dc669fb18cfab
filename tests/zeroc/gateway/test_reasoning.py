"""A reasoning model's thinking apart from its answer (zeroc/gateway/reasoning.py, `--reasoning-parser`): canned
answers split whole and streamed (cut anywhere, the pieces add up to the whole split), with the tool-call parser on
the content; and through a real gateway with the `openai` client: where the prompt leaves the block open the answer
is reasoning (the bundled model never closes it), where it closes it the answer is content and a guide applies from
the first token; a guide after an open block waits for "</think>", which must be one token of the vocabulary."""

from __future__ import annotations

import json
import random

import openai
import pytest

from gateway_support import openai_on_gateway
from zeroc.gateway.chat import ChatTemplate
from zeroc.gateway.errors import APIError
from zeroc.gateway.reasoning import REASONING_PARSERS, Reasoning
from zeroc.gateway.sse import Reply
from zeroc.gateway.tool_parsers import PARSERS
from zeroc.gateway.tools import ToolCalls

SYNTAX = REASONING_PARSERS["deepseek_r1"]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TEXTS = [  # (text, the prompt leaves the block open, (reasoning, content))
    ("Paris is in France.</think>\n\nIt is sunny.", True, ("Paris is in France.", "It is sunny.")),
    ("\n<think>\nLet me see.\n</think>\n\nYes.", True, ("\nLet me see.\n", "Yes.")),  # the model opens it itself
    ("Thinking about < and </thi... still thinking", True, ("Thinking about < and </thi... still thinking", "")),
    ("</think>Only an answer.", True, ("", "Only an answer.")),
    ("An answer, no thinking. </think> is just text here.", False,
     (None, "An answer, no thinking. </think> is just text here.")),
]


@pytest.mark.parametrize("prompt, open_", [("<|user|>hi<|assistant|><think>\n", True), ("hi", True),
                                           ("<think>\n\n</think>\n\n", False), ("<think>a</think> <think>", True)])
def test_the_prompt_says_whether_the_answer_starts_inside_the_block(prompt, open_):
    assert SYNTAX.open_after(prompt) is open_


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("text, open_, want", TEXTS)
def test_whole_and_streamed_answers_split_alike(text, open_, want):
    assert Reasoning(SYNTAX, open_).whole(text) == want
    rng = random.Random(7)
    for _ in range(30):
        split, thought, content = Reasoning(SYNTAX, open_), "", ""
        for piece in _pieces(text, rng):
            t, c = split.delta(0, piece, False)
            thought, content = thought + t, content + c
            assert "</think>" not in t + c or not open_
        t, c = split.delta(0, "", True)  # the finish flushes what was held back
        assert (thought + t if open_ else None, content + c) == want


def _stream(reply: Reply, pieces: list[str]) -> tuple[str, str, list, str | None]:
    """What a client adds up from the chunks of `pieces` and the finish: reasoning, content, calls, finish."""
    deltas = [reply.chunk(p, [])["choices"][0] for p in pieces] + [reply.chunk("", [], "stop")["choices"][0]]
    thought = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
    assert all(d["delta"].get("reasoning") == d["delta"].get("reasoning_content") for d in deltas)
    return thought, content, calls, deltas[-1]["finish_reason"]


def test_the_content_goes_to_the_tool_call_parser_streamed_and_whole():
    text = f"I should call the tool.</think>\n\nChecking.\n{CALL}"
    for _ in range(3):
        reply = Reply("chatcmpl-1", "m", True, False, 0, tools=ToolCalls("chatcmpl-1", None, PARSERS["hermes"]),
                      reasoning=Reasoning(SYNTAX, True))
        thought, content, calls, finish = _stream(reply, _pieces(text, random.Random(len(text))))
        assert (thought, content, finish) == ("I should call the tool.", "Checking.", "tool_calls")
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
    whole = Reply("chatcmpl-1", "m", True, False, 0, tools=ToolCalls("chatcmpl-1", None, PARSERS["hermes"]),
                  reasoning=Reasoning(SYNTAX, True))._choice(text, [], "stop", False)
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["reasoning_content"] == "I should call the tool."
    assert whole["message"]["content"] == "Checking." and len(whole["message"]["tool_calls"]) == 1
    plain = Reply("chatcmpl-1", "m", True, False, 0, reasoning=Reasoning(SYNTAX, True))._choice(
        "Hmm.</think>Done.", [], "stop", False)
    assert plain["message"] == {"role": "assistant", "content": "Done.", "reasoning_content": "Hmm.",
                                "reasoning": "Hmm."}


def test_chat_template_kwargs_reach_the_template_but_never_replace_the_servers_variables():
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}", {})
    chat = [{"role": "user", "content": "hi"}]
    assert template.render(chat) == "hi"
    assert template.render(chat, extra={"enable_thinking": False}) == "hi<think></think>"
    with pytest.raises(APIError, match="'messages' is set by the server"):
        template.render(chat, extra={"messages": []})


@pytest.fixture(scope="module")
def thinking_api(services):
    """A gateway that reads DeepSeek-R1's thinking (`--reasoning-parser deepseek_r1`)."""
    with openai_on_gateway(services.decode, "--reasoning-parser", "deepseek_r1") as client:
        yield client


def _ask(api, content: str, stream: bool = False, **kw):
    return api.chat.completions.create(model="zeroc-tiny", messages=[{"role": "user", "content": content}],
                                       max_tokens=24, temperature=0, stream=stream, **kw)


def test_an_open_block_makes_the_answer_reasoning_whole_and_streamed(thinking_api, api):
    got = _ask(thinking_api, "What is a list?").choices[0]
    plain = _ask(api, "What is a list?").choices[0]  # the gateway without a parser: the same tokens as content
    assert got.message.reasoning_content == plain.message.content and got.message.content is None
    assert got.finish_reason == "length"
    chunks = list(_ask(thinking_api, "What is a list?", stream=True))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert streamed == plain.message.content
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_a_closed_block_makes_the_answer_content_and_guided_from_the_first_token(thinking_api):
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
              "properties": {"ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    got = _ask(thinking_api, "I thought enough.</think>", response_format=fmt).choices[0]  # the prompt closes it
    assert getattr(got.message, "reasoning_content", None) is None
    assert got.finish_reason == "stop" and isinstance(json.loads(got.message.content)["ok"], bool)


def test_a_guide_after_an_open_block_needs_the_marker_to_be_one_token(thinking_api):
    with pytest.raises(openai.BadRequestError) as err:  # the bundled vocabulary spells "</think>" in pieces
        _ask(thinking_api, "What is a list?", response_format={"type": "json_object"})
    assert "</think>" in err.value.message and "must be one" in err.value.message
    with pytest.raises(openai.BadRequestError, match="set by the server"):
        _ask(thinking_api, "hi", extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert _ask(thinking_api, "still serving").choices[0].finish_reason == "length"
