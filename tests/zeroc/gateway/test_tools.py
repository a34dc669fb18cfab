"""Function calling through the gateway with the official `openai` client (zeroc/gateway/tools.py): a named
tool_choice and "required" give calls whose arguments are instances of the tools' schemas (checked with
`jsonschema`), plain and streamed alike; "auto" and malformed choices are 400s that say what works."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gateway_support import openai_on_gateway

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 8}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def hermes_api(services):
    """A gateway that reads Hermes-style calls (`--tool-call-parser hermes`) for tool_choice "auto"."""
    with openai_on_gateway(services.decode, "--tool-call-parser", "hermes") as client:
        yield client


def _ask(api, stream: bool = False, **kw):
    return api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                       temperature=0, stream=stream, **kw)


def _streamed(chunks) -> tuple[list[dict], str | None]:
    """The calls a stream's deltas add up to (the openai client's own accumulation rules), and its finish reason."""
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        for choice in c.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] = (d.function.name if d.function and d.function.name else call["name"])
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    return [calls[i] for i in sorted(calls)], finish


def _calls(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]


def test_a_named_tool_choice_is_a_call_of_that_function_plain_and_streamed(api):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    got = _ask(api, tool_choice=choice)
    message = got.choices[0].message
    assert message.content is None and got.choices[0].finish_reason == "stop"
    [call] = _calls(message)
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    calls, finish = _streamed(_ask(api, stream=True, tool_choice=choice))
    assert [(c["name"], c["arguments"]) for c in calls] == [(call["name"], call["arguments"])] and finish == "stop"


def test_required_gives_calls_of_the_tools_plain_and_streamed(api):
    got = _ask(api, tool_choice="required", parallel_tool_calls=False)
    assert got.choices[0].finish_reason == "tool_calls" and got.choices[0].message.content is None
    [call] = _calls(got.choices[0].message)
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    streamed, finish = _streamed(_ask(api, stream=True, tool_choice="required", parallel_tool_calls=False))
    assert [(c["name"], c["arguments"]) for c in streamed] == [(call["name"], call["arguments"])]
    assert finish == "tool_calls"


def test_parallel_calls_cut_short_come_back_as_text(api):
    """The bundled model goes on adding calls to the array; cut by max_tokens, the answer is its text."""
    got = _ask(api, tool_choice="required")
    choice = got.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith('[{"name":"get_')
    chunks = list(_ask(api, stream=True, tool_choice="required"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert not _streamed(chunks)[0]


def test_a_conversation_with_earlier_calls_and_their_answers_is_taken(api):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    got = api.chat.completions.create(model="zeroc-tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                      max_tokens=4, temperature=0)
    assert got.choices[0].message.tool_calls is None and got.choices[0].message.content


@pytest.mark.parametrize("kw, words", [
    ({}, '"auto" (the default with tools) needs a parser'),
    ({"tool_choice": "auto"}, 'use "required" or name a function'),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool is named 'nope'"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot too"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "names must be unique"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "tools.0.function.name"),
    ({"tools": None, "tool_choice": "required"}, "only allowed when tools are given")])
def test_tool_choices_the_server_cannot_honour_are_400s(api, kw, words):
    kw = {"tools": TOOLS, **kw}
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=4,
                                    **{k: v for k, v in kw.items() if v is not None})
    assert words in err.value.message


# What a model trained on Hermes-style calls writes when it calls a tool; the bundled model is steered into it.
HERMES = (r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{2,8}", "unit": "C"\}\}'
          r'</tool_call>')


def test_auto_reads_the_models_own_tool_call_syntax_plain_and_streamed(hermes_api):
    steer = {"structured_outputs": {"regex": HERMES}}
    got = hermes_api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, tools=TOOLS, max_tokens=120,
                                             temperature=0, extra_body=steer)  # tool_choice: "auto", the default
    message = got.choices[0].message
    assert got.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    [call] = _calls(message)
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    chunks = list(hermes_api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, tools=TOOLS,
                                                     max_tokens=120, temperature=0, extra_body=steer, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking."
    calls, finish = _streamed(chunks)
    assert [(c["name"], c["arguments"]) for c in calls] == [(call["name"], call["arguments"])]
    assert finish == "tool_calls"
    free = hermes_api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8,
                                              temperature=0)  # no call in the text: plain content
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content


def test_mistral_calls_are_read_with_the_special_tokens_kept(services):
    """`--tool-call-parser mistral`: its markers are special tokens in Mistral's vocabularies, so the gateway asks the
    decode service to keep special tokens' text for "auto" (the bundled model's forced </s> shows it), and reads
    the v11 `[TOOL_CALLS]name{...}` form (spelled in plain text here, steered by a regex guide)."""
    steer = {"structured_outputs": {"regex": r'Checking\.\[TOOL_CALLS\]get_weather\{"city": "Paris", "unit": "C"\}'}}
    with openai_on_gateway(services.decode, "--tool-call-parser", "mistral") as api:
        got = _ask(api, extra_body=steer)
        [call] = _calls(got.choices[0].message)
        assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris", "unit": "C"})
        assert got.choices[0].message.content == "Checking." and got.choices[0].finish_reason == "tool_calls"
        forced = api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, tools=TOOLS, max_tokens=2,
                                             temperature=0, logit_bias={"1": 100}, extra_body={"ignore_eos": True})
        assert forced.choices[0].message.content == "</s></s>"  # kept: a marker could be one
        plain = api.chat.completions.create(model="zeroc-tiny", messages=MESSAGES, max_tokens=2, temperature=0,
                                            logit_bias={"1": 100}, extra_body={"ignore_eos": True})
        assert plain.choices[0].message.content == ""  # no tools: the default, as in vLLM


def test_pythonic_calls_are_read_from_a_python_list_plain_and_streamed(services):
    """`--tool-call-parser pythonic` (Llama 3.2 and 4): the answer `[get_weather(city="Paris", unit="C")]`, steered
    by a regex guide, is one call, whole and streamed."""
    steer = {"structured_outputs": {"regex": r'\[get_weather\(city="Paris", unit="C"\)\]'}}
    with openai_on_gateway(services.decode, "--tool-call-parser", "pythonic") as api:
        got = _ask(api, extra_body=steer).choices[0]
        [call] = _calls(got.message)
        assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris", "unit": "C"})
        assert got.message.content is None and got.finish_reason == "tool_calls"
        calls, finish = _streamed(_ask(api, stream=True, extra_body=steer))
        assert [(c["name"], c["arguments"]) for c in calls] == [(call["name"], call["arguments"])]
        assert finish == "tool_calls"
