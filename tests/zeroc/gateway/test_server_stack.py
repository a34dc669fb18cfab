"""The gateway's event loop and HTTP implementation: flags or ZEROC_GATEWAY_LOOP / _HTTP, checked names,
"auto" resolved to what is installed; the tool-call parser, checked too."""

from __future__ import annotations

import importlib.util

import pytest

from zeroc.gateway.command import TOOL_PARSERS, GatewaySettings, server_stack
from zeroc.gateway.tool_parsers import PARSERS


def test_loop_and_http_come_from_the_environment_and_are_checked():
    s = GatewaySettings.from_env({"ZEROC_GATEWAY_LOOP": "asyncio", "ZEROC_GATEWAY_HTTP": "h11"})
    assert (s.loop, s.http) == ("asyncio", "h11") and server_stack(s) == ("asyncio", "h11")
    with pytest.raises(ValueError, match="loop"):
        GatewaySettings.from_env({"ZEROC_GATEWAY_LOOP": "trio"})
    with pytest.raises(ValueError, match="http"):
        GatewaySettings(http="hyper")


def test_auto_takes_the_fast_implementations_when_installed():
    want = ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "httptools" if importlib.util.find_spec("httptools") else "h11")
    assert server_stack(GatewaySettings()) == want


def test_the_tool_call_parser_is_one_the_gateway_has():
    assert GatewaySettings.from_env({"ZEROC_GATEWAY_TOOL_CALL_PARSER": "hermes"}).tool_call_parser == "hermes"
    assert GatewaySettings().tool_call_parser == ""
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes, llama3_json, mistral, pythonic"):
        GatewaySettings(tool_call_parser="xml")
    assert set(TOOL_PARSERS) == set(PARSERS)  # the flag's choices, kept without importing the parsers


def test_the_reasoning_parser_is_one_the_gateway_has():
    from zeroc.gateway.command import REASONING_PARSERS as NAMES
    from zeroc.gateway.reasoning import REASONING_PARSERS

    env = {"ZEROC_GATEWAY_REASONING_PARSER": "deepseek_r1"}
    assert GatewaySettings.from_env(env).reasoning_parser == "deepseek_r1" and not GatewaySettings().reasoning_parser
    with pytest.raises(ValueError, match="reasoning_parser must be one of deepseek_r1, qwen3"):
        GatewaySettings(reasoning_parser="o1")
    assert set(NAMES) == set(REASONING_PARSERS)


def test_the_curl_line_of_an_https_gateway_names_the_ca():
    from zeroc.gateway.command import curl_line

    line = curl_line("https://127.0.0.1:8443", "Hi", None, "/tmp/pki dir/ca.pem")
    assert line.startswith("curl -N --cacert '/tmp/pki dir/ca.pem' https://127.0.0.1:8443/v1/completions")
    assert "--cacert" not in curl_line("http://127.0.0.1:8000", "Hi")
