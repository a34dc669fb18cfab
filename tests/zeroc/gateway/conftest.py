"""The gateway as a real uvicorn process in front of the session's real decode services."""

from __future__ import annotations

import openai
import pytest

from gateway_support import start_gateway


@pytest.fixture(scope="session")
def gateway(services):
    """The gateway balancing over the disaggregated and the colocated decode service (same greedy output)."""
    gw = start_gateway(services.decode, services.colocated)
    yield gw
    gw.process.stop()


@pytest.fixture(scope="module")
def api(gateway):
    """The official `openai` client on the session's gateway."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client
