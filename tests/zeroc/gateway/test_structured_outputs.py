"""Structured output through the gateway with the official `openai` client: OpenAI's response_format (json_object
and json_schema) on both endpoints, plain and streamed, and vLLM's structured_outputs extension; bad ones are 400s
that name the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "days": {"type": "integer", "minimum": 1, "maximum": 30}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}


def test_chat_response_format_json_schema_plain_and_streamed(api):
    messages = [{"role": "user", "content": "Plan a trip."}]
    got = api.chat.completions.create(model="zeroc-tiny", messages=messages, max_tokens=60, response_format=FORMAT,
                                      temperature=0)
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].message.content), SCHEMA)
    chunks = api.chat.completions.create(model="zeroc-tiny", messages=messages, max_tokens=60, response_format=FORMAT,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == got.choices[0].message.content


def test_completions_json_object_and_structured_outputs(api):
    got = api.completions.create(model="zeroc-tiny", prompt="The data is", max_tokens=60, temperature=0,
                                 extra_body={"response_format": {"type": "json_object"}})  # a vLLM extension here
    assert isinstance(json.loads(got.choices[0].text), dict)
    got = api.completions.create(model="zeroc-tiny", prompt="Pick:", max_tokens=10, temperature=1.0, n=3, seed=1,
                                 extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert all(c.text in ("left", "right") and c.finish_reason == "stop" for c in got.choices)
    got = api.completions.create(model="zeroc-tiny", prompt="Mail:", max_tokens=30,
                                 extra_body={"structured_outputs": {"regex": r"[a-z]{3}@[a-z]{3}\.com"}})
    assert re.fullmatch(r"[a-z]{3}@[a-z]{3}\.com", got.choices[0].text)
    got = api.completions.create(model="zeroc-tiny", prompt="Pick:", max_tokens=10,  # vLLM's older spelling
                                 extra_body={"guided_choice": ["up", "down"]})
    assert got.choices[0].text in ("up", "down")


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema: required"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "does not compile"),
    ({"structured_outputs": {"regex": "a(b"}}, "regex does not compile"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "not both"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_*: set one of"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "not both")])
def test_bad_structured_outputs_are_400s_naming_the_field(api, extra, words):
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="zeroc-tiny", prompt="Hi", max_tokens=4, extra_body=extra)
    assert words in err.value.message
    assert api.completions.create(model="zeroc-tiny", prompt="Hi", max_tokens=2).choices[0].text is not None
