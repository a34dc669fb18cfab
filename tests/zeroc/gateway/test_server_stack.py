"""The gateway's event loop and HTTP implementation: flags or ZEROC_GATEWAY_LOOP / _HTTP, checked names,
"auto" resolved to what is installed."""

from __future__ import annotations

import importlib.util

import pytest

from zeroc.gateway.command import GatewaySettings, server_stack


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
