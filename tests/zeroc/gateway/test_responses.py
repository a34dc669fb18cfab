"""OpenAI's Responses API (`/v1/responses`, zeroc/gateway/responses.py) through the official `openai` client: the
oracle is /v1/chat/completions on the same gateway for the chat request a Response means (text, log-probabilities,
function calls, thinking, a conversation continued by previous_response_id), and the client's own stream
accumulator (`responses.stream`) for the events' order; kept responses are read, listed and deleted by the key that
made them only; requests the server cannot honour are 400s naming the field."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import grpc
import jsonschema
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from gateway_support import openai_on_gateway
from zeroc.client import Chunk, ClientError, Result, TokenLogprob, Usage
from zeroc.config import BUNDLED_MODEL
from zeroc.gateway.errors import APIError
from zeroc.gateway.logprobs import LogprobFormat
from zeroc.gateway.reasoning import REASONING_PARSERS, Reasoning
from zeroc.gateway.response_events import response_events
from zeroc.gateway.response_store import ResponseStore
from zeroc.gateway.responses import (ResponseShape, ResponsesRequest, as_responses_error, chat_request, input_items,
                                    unique_ids)
from zeroc.gateway.sse import Reply
from zeroc.gateway.tool_parsers import PARSERS
from zeroc.gateway.tools import ToolCalls
from zeroc.tokenizer import Tokenizer

INSTRUCTIONS = "You answer in Python."
QUESTION = "How do I read a file?"
MESSAGES = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}}}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}


class Answer(BaseModel):
    ok: bool
    word: Literal["yes", "no"]


def _chat(api, messages=MESSAGES, **kw):
    return api.chat.completions.create(model="zeroc-tiny", messages=messages, temperature=0, **kw)


def _events(stream) -> list:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_a_response_is_the_chat_answer_of_its_instructions_and_input_whole_and_streamed(api):
    want = _chat(api, max_tokens=10)
    got = api.responses.create(model="zeroc-tiny", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=10,
                               temperature=0, store=True, metadata={"k": "v"})
    assert got.object == "response" and got.id.startswith("resp_") and got.model == "zeroc-tiny"
    assert got.output_text == want.choices[0].message.content and [o.type for o in got.output] == ["message"]
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert (got.usage.input_tokens, got.usage.output_tokens) == (want.usage.prompt_tokens, 10)
    assert got.usage.total_tokens == want.usage.prompt_tokens + 10 and got.store is True
    assert got.metadata == {"k": "v"} and got.instructions == INSTRUCTIONS and got.max_output_tokens == 10

    events = _events(api.responses.create(model="zeroc-tiny", instructions=INSTRUCTIONS, input=QUESTION,
                                          max_output_tokens=10, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == got.output_text == events[-4].text == events[-1].response.output_text
    assert len({e.item_id for e in events if hasattr(e, "item_id")}) == 1
    assert events[-1].response.usage.output_tokens == 10 and events[0].response.status == "in_progress"


def test_input_items_are_the_conversation_and_the_client_helper_accumulates_the_stream(api):
    items = [{"role": "developer", "content": [{"type": "input_text", "text": INSTRUCTIONS}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "How do I"},
                                                              {"type": "input_text", "text": "read a file?"}]}]
    want = _chat(api, [{"role": "developer", "content": INSTRUCTIONS},
                       {"role": "user", "content": "How do I\nread a file?"}], max_tokens=6)
    with api.responses.stream(model="zeroc-tiny", input=items, max_output_tokens=6, temperature=0,
                              text={"format": {"type": "text"}}) as stream:
        events = _events(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == want.choices[0].message.content == events[-1].response.output_text
    assert events[-1].type == "response.incomplete"  # cut by max_output_tokens: OpenAI's last event then


def test_a_schema_format_is_parsed_by_the_client_whole_and_streamed(api):
    got = api.responses.parse(model="zeroc-tiny", input="Is it ok?", text_format=Answer, max_output_tokens=40,
                              temperature=0)
    assert got.status == "completed" and isinstance(got.output_parsed, Answer)
    with api.responses.stream(model="zeroc-tiny", input="Is it ok?", text_format=Answer, max_output_tokens=40,
                              temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == got.output_parsed and final.output_text == got.output_text
    assert final.id != got.id and final.status == "completed"
    plain = api.responses.create(model="zeroc-tiny", input="Is it ok?", max_output_tokens=40, temperature=0,
                                 text={"format": {"type": "json_object"}})
    assert plain.output_text.startswith("{")  # guided; the bundled model's object may run past the limit


def test_a_named_tool_choice_is_a_function_call_item_whole_and_streamed(api):
    choice = {"type": "function", "name": "get_weather"}
    got = api.responses.create(model="zeroc-tiny", input="Weather in Paris?", tools=[TOOL], tool_choice=choice,
                               max_output_tokens=80, temperature=0)
    [call] = got.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.status == "completed" and got.status == "completed" and got.output_text == ""
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert got.tools[0].name == "get_weather" and got.tool_choice.name == "get_weather"
    with api.responses.stream(model="zeroc-tiny", input="Weather in Paris?", tools=[TOOL], tool_choice=choice,
                              max_output_tokens=80, temperature=0) as stream:
        events = _events(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == call.arguments == done[0].arguments == final.output[0].arguments
    assert final.output[0].name == "get_weather" and final.output[0].id == events[2].item.id


def test_function_call_items_and_their_outputs_are_the_chat_conversation(api):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}
    items = [{"role": "user", "content": "Weather in Paris?"}, call,
             {"type": "function_call_output", "call_id": "call_1", "output": "18 C and sunny"},
             {"type": "reasoning", "id": "rs_1", "summary": []}]
    want = _chat(api, [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}],
                 max_tokens=6, tools=[{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}],
                 tool_choice="none")
    got = api.responses.create(model="zeroc-tiny", input=items, tools=[TOOL], tool_choice="none",
                               max_output_tokens=6, temperature=0)
    assert got.output_text == want.choices[0].message.content
    assert got.usage.input_tokens == want.usage.prompt_tokens


def test_log_probabilities_are_chats_whole_and_streamed(api):
    want = _chat(api, max_tokens=6, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    got = api.responses.create(model="zeroc-tiny", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=6,
                               temperature=0, top_logprobs=2, include=["message.output_text.logprobs"])
    entries = got.output[0].content[0].logprobs
    assert [(e.token, e.bytes) for e in entries] == [(w.token, w.bytes) for w in want]
    assert [e.logprob for e in entries] == pytest.approx([w.logprob for w in want], abs=1e-4)
    assert all([t.token for t in e.top_logprobs] == [t.token for t in w.top_logprobs] for e, w in zip(entries, want))
    events = _events(api.responses.create(model="zeroc-tiny", instructions=INSTRUCTIONS, input=QUESTION,
                                          max_output_tokens=6, temperature=0, top_logprobs=2, stream=True))
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    assert [e.token for e in streamed] == [w.token for w in want]
    plain = api.responses.create(model="zeroc-tiny", input=QUESTION, max_output_tokens=2, temperature=0)
    assert plain.output[0].content[0].logprobs == []


def test_thinking_is_a_reasoning_item_whole_and_streamed(services, api):
    plain = api.responses.create(model="zeroc-tiny", input="What is a list?", max_output_tokens=12, temperature=0)
    with openai_on_gateway(services.decode, "--reasoning-parser", "deepseek_r1") as thinking:
        got = thinking.responses.create(model="zeroc-tiny", input="What is a list?", max_output_tokens=12,
                                        temperature=0)
        events = _events(thinking.responses.create(model="zeroc-tiny", input="What is a list?",
                                                   max_output_tokens=12, temperature=0, stream=True))
    [item] = got.output  # the bundled model never closes the block: all of it is thinking
    assert item.type == "reasoning" and item.content[0].text == plain.output_text and got.output_text == ""
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == plain.output_text and events[-1].response.output[0].content[0].text == streamed
    assert not any(e.type == "response.output_text.delta" for e in events)


@pytest.mark.parametrize("kw, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0.type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [TOOL], "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [TOOL]}, "tool_choice"),  # "auto" needs a --tool-call-parser
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, None),
])
def test_requests_the_server_cannot_honour_are_400s_and_it_keeps_serving(api, kw, param):
    body = {"model": "zeroc-tiny", "input": QUESTION, "max_output_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as err:
        api.responses.create(**body)
    assert param is None or err.value.body["param"] == param
    assert api.responses.create(model="zeroc-tiny", input="still", max_output_tokens=2).usage.output_tokens == 2


def test_the_chat_request_a_response_means():
    req = ResponsesRequest.model_validate({
        "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0.5, "parallel_tool_calls": False,
        "input": [{"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
                  {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                  {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "a", "output": [{"type": "input_text", "text": "1"}]}],
        "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "g", "strict": True}],
        "tool_choice": "required", "text": {"format": {"type": "json_object"}}})
    chat = chat_request(req, input_items(req.input))
    assert [m.role for m in chat.messages] == ["system", "assistant", "tool"]
    assert chat.messages[1].content == "Hi." and [c["id"] for c in chat.messages[1].tool_calls] == ["a", "b"]
    assert chat.messages[2].tool_call_id == "a" and chat.messages[2].content == "1"
    assert chat.max_completion_tokens == 9 and chat.temperature == 0.5 and chat.parallel_tool_calls is False
    assert [t.function.name for t in chat.tools] == ["f", "g"] and chat.tools[1].function.strict is True
    assert chat.tool_choice == "required" and chat.response_format.type == "json_object"
    with pytest.raises(APIError, match="only function tools"):
        chat_request(ResponsesRequest.model_validate({"tools": [{"type": "file_search"}], "input": "x"}),
                     input_items("x"))
    bad = ResponsesRequest.model_validate({"tools": [{"type": "function", "name": "no spaces"}], "input": "x"})
    with pytest.raises(APIError) as chat_error:
        chat_request(bad, input_items("x"))
    named = as_responses_error(chat_error.value)  # chat's field, named as the Responses request's
    assert chat_error.value.param == "tools.0.function.name" and named.param == "tools.0.name"
    assert named.message.startswith("tools.0.name: ") and named.status == 400
    late = as_responses_error(APIError(400, "messages.2.tool_call_id: no such call", param="messages.2.tool_call_id"))
    assert late.param == "input" and late.message == "input: no such call"
    assert as_responses_error(APIError(400, "x", param="max_completion_tokens")).param == "max_output_tokens"
    with pytest.raises(APIError, match="two items with the id"):
        unique_ids(input_items([{"type": "message", "id": "m1", "role": "user", "content": "a"},
                                {"type": "message", "id": "m1", "role": "user", "content": "b"}]))
    listed = input_items([{"role": "user", "content": [{"type": "input_text", "text": "a"}]}])
    assert listed[0]["type"] == "message"  # listed as OpenAI lists items, whatever the client left out


_EVENT = TypeAdapter(ResponseStreamEvent)
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>'


def _usage() -> Usage:
    return Usage(prompt_tokens=5, completion_tokens=4, ttft_ms=1.0, cached_prefix_tokens=0, kv_bytes_received=0)


def _chunk(i: int, piece: str) -> Chunk:
    return Chunk([10 + i], piece, [TokenLogprob(-0.5 - i, [])])  # a token a piece, each with its log-probability


async def _canned(pieces: list[str], error: ClientError | None = None):
    for i, piece in enumerate(pieces[1:], 1):
        yield _chunk(i, piece)
    if error is not None:
        raise error
    yield Result("r", "stop", _usage())


def _run(reply: Reply, shape: ResponseShape, pieces: list[str], error: ClientError | None = None) -> list[dict]:
    """The events of a canned stream, each valid as the `openai` package's event types read them."""
    async def go() -> bytes:
        return b"".join([e async for e in response_events(reply, shape, _chunk(0, pieces[0]),
                                                          _canned(pieces, error))])
    raw = asyncio.run(go()).decode()
    events = [json.loads(block.split("\ndata: ", 1)[1]) for block in raw.split("\n\n") if block]
    for e in events:
        _EVENT.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert all(block.startswith(f"event: {e['type']}\n") for block, e in zip(raw.split("\n\n"), events))
    return events


def test_thinking_then_text_then_a_call_are_three_items_in_order_each_closed_before_the_next():
    reply = Reply("resp_1", "m", True, False, 0, tools=ToolCalls("resp_1", None, PARSERS["hermes"]),
                  reasoning=Reasoning(REASONING_PARSERS["deepseek_r1"], True))
    shape = ResponseShape(ResponsesRequest.model_validate({"input": "x"}), "m", 0)
    text = f"Let me see.</think>\n\nChecking.\n{CALL}"
    events = _run(reply, shape, [text[i: i + 7] for i in range(0, len(text), 7)])
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert added == [d["type"] for d in done] == ["reasoning", "message", "function_call"]
    assert done[0]["content"][0]["text"] == "Let me see." and done[1]["content"][0]["text"] == "Checking."
    assert json.loads(done[2]["arguments"]) == {"city": "Paris", "unit": "C"} and done[2]["name"] == "get_weather"
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"] == done


def test_held_back_text_keeps_its_log_probabilities_and_thinking_counts_as_reasoning_tokens():
    """The auto tool parser holds " <" back (it may begin a call); its token's log-probability comes out with it."""
    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    reply = Reply("resp_3", "m", True, False, 0, logprobs=LogprobFormat(tok, chat=True),
                  tools=ToolCalls("resp_3", None, PARSERS["hermes"]),
                  reasoning=Reasoning(REASONING_PARSERS["deepseek_r1"], True))
    shape = ResponseShape(ResponsesRequest.model_validate({"input": "x", "top_logprobs": 1}), "m", 0,
                          count_tokens=lambda text: len(text.split()))
    events = _run(reply, shape, ["One two", " three</think>", "Hi", " <", "b>", "!"])
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["text"] == "Hi <b>!" and [lp["logprob"] for lp in done["logprobs"]] == [-2.5, -3.5, -4.5, -5.5]
    deltas = [lp["logprob"] for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert deltas == [-2.5, -3.5, -4.5, -5.5]
    usage = events[-1]["response"]["usage"]
    assert usage["output_tokens_details"]["reasoning_tokens"] == 3  # "One two three", as count_tokens counts
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 5}


def test_a_named_call_opens_after_the_thinking_that_leads_to_it():
    reply = Reply("resp_4", "m", True, False, 0, tools=ToolCalls("resp_4", "get_weather"),
                  reasoning=Reasoning(REASONING_PARSERS["deepseek_r1"], True))
    shape = ResponseShape(ResponsesRequest.model_validate({"input": "x"}), "m", 0)
    events = _run(reply, shape, ["Hmm, ", "Paris.</think>", '{"city":', ' "Paris"}'])
    added = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "function_call")]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    [call] = [e["item"] for e in events if e["type"] == "response.output_item.done" and e["output_index"] == 1]
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["name"] == "get_weather"


def test_a_call_failing_mid_stream_ends_with_response_failed_and_its_items_incomplete():
    reply = Reply("resp_2", "m", True, False, 0)
    shape = ResponseShape(ResponsesRequest.model_validate({"input": "x"}), "m", 0)
    events = _run(reply, shape, ["Hello", " there"], ClientError(grpc.StatusCode.UNAVAILABLE, "the service went"))
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error" and "UNAVAILABLE" in last["response"]["error"]["message"]
    [item] = last["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == "Hello there"
    assert [e["type"] for e in events[-4:-1]] == ["response.output_text.done", "response.content_part.done",
                                                  "response.output_item.done"]


def test_previous_response_id_continues_the_conversation_plain_and_with_a_call(api, gateway):
    first = api.responses.create(model="zeroc-tiny", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=6,
                                 temperature=0)
    second = api.responses.create(model="zeroc-tiny", previous_response_id=first.id, input="And a tuple?",
                                  max_output_tokens=6, temperature=0, stream=True)
    final = [e for e in second][-1].response  # streamed: kept too
    want = _chat(api, [{"role": "user", "content": QUESTION},  # the instructions are not carried over (OpenAI's)
                       {"role": "assistant", "content": first.output_text},
                       {"role": "user", "content": "And a tuple?"}], max_tokens=6)
    assert final.output_text == want.choices[0].message.content and final.previous_response_id == first.id
    assert final.usage.input_tokens == want.usage.prompt_tokens
    third = api.responses.create(model="zeroc-tiny", previous_response_id=final.id, input="Thanks.",
                                 max_output_tokens=2, temperature=0)
    items = api.responses.input_items.list(third.id, order="asc")
    assert [getattr(i, "role", i.type) for i in items.data] == ["user", "assistant", "user", "assistant", "user"]
    assert items.data[3].content[0].text == final.output_text and len({i.id for i in items.data}) == 5
    page = api.responses.input_items.list(third.id, limit=2)  # newest first, in pages
    assert [i.id for i in page.data] == [i.id for i in items.data[::-1][:2]] and page.has_more

    call = api.responses.create(model="zeroc-tiny", input="Weather in Paris?", tools=[TOOL], max_output_tokens=80,
                                tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    answered = api.responses.create(model="zeroc-tiny", previous_response_id=call.id, tools=[TOOL], tool_choice="none",
                                    input=[{"type": "function_call_output", "call_id": call.output[0].call_id,
                                            "output": "18 C"}], max_output_tokens=4, temperature=0)
    chat_tool = [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    want = _chat(api, [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"id": call.output[0].call_id, "type": "function",
                            "function": {"name": "get_weather", "arguments": call.output[0].arguments}}]},
                       {"role": "tool", "tool_call_id": call.output[0].call_id, "content": "18 C"}],
                 max_tokens=4, tools=chat_tool, tool_choice="none")
    assert answered.output_text == want.choices[0].message.content


def test_kept_responses_are_read_and_deleted_by_their_key_only(api, gateway):
    got = api.responses.create(model="zeroc-tiny", input=QUESTION, max_output_tokens=3, temperature=0)
    assert api.responses.retrieve(got.id).output_text == got.output_text
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="someone-else", max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(got.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="zeroc-tiny", previous_response_id=got.id, input="x", max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(got.id)
    api.responses.delete(got.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(got.id)
    unkept = api.responses.create(model="zeroc-tiny", input=QUESTION, max_output_tokens=1, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(unkept.id)


def test_a_gateway_that_keeps_nothing_says_so(services):
    with openai_on_gateway(services.colocated, "--responses-store-mb", "0") as api:
        got = api.responses.create(model="zeroc-tiny", input=QUESTION, max_output_tokens=1)
        assert got.store is False
        with pytest.raises(openai.BadRequestError, match="keeps no responses"):
            api.responses.create(model="zeroc-tiny", previous_response_id=got.id, input="x", max_output_tokens=1)


def test_the_store_drops_the_least_recently_used_and_files_by_owner():
    store = ResponseStore(capacity_bytes=600)
    resp = [{"id": f"resp_{i}", "output": [{"text": "x" * 100}]} for i in range(4)]
    assert store.put("a", resp[0], []) and store.put("a", resp[1], []) and store.put("b", resp[2], [])
    assert store.get("b", "resp_0") is None and store.get("a", "resp_0").response == resp[0]  # a's, and now fresh
    store.put("a", resp[3], [{"role": "user", "content": "y" * 120}])
    assert store.get("a", "resp_1") is None and store.get("a", "resp_0") is not None  # the least recently used went
    assert store.used <= 600 and not store.put("a", {"id": "big", "output": "z" * 700}, [])
    store.get("a", "resp_0").response["output"].clear()  # a reader's copy: the kept one stays as it was
    assert store.get("a", "resp_0").response == resp[0]
    assert store.delete("a", "resp_0") and not store.delete("a", "resp_0")
