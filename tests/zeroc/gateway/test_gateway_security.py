"""The gateway in a TLS deployment with bearer tokens (`zeroc stack up --tls` with a token file): HTTPS verified by
the deployment's CA, TLS to the decode services, a known key needed for every call but /health (401 otherwise),
and each caller's key carried to the decode services, so one tenant's prompts are not in another's prefix cache:
`cached_tokens`, which would tell a caller that someone sent its prompt before, stays 0 for another tenant. Driven
by the official openai client over httpx with the deployment's CA."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import openai
import pytest

from zeroc.stack import Stack

PROMPT = "Tenants keep their prompts to themselves: " + " ".join(f"w{i}" for i in range(120))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("alice-key tenant-a\nbob-key tenant-b\ngateway-key ops\n")
    env = {"ZEROC_SECURITY_TOKENS_FILE": str(tokens), "ZEROC_GATEWAY_TOKEN": "gateway-key"}
    with Stack(1, env=env, gateway_args=[], tls=True) as stack:
        yield stack


def _api(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=str(stack.pki.ca)))


def _cached(api: openai.OpenAI) -> int:
    done = api.completions.create(model="zeroc-tiny", prompt=PROMPT, max_tokens=1, temperature=0)
    return done.usage.prompt_tokens_details.cached_tokens


def test_each_tenant_reads_only_its_own_prefix_cache_through_the_gateway(secured):
    assert secured.gateway.startswith("https://")
    alice, bob = _api(secured, "alice-key"), _api(secured, "bob-key")
    assert _cached(alice) == 0 and max(_cached(alice) for _ in range(2)) > 0  # her prefix, cached for her
    assert _cached(bob) == 0  # ... and not for him: his key reached the decode service as his tenant
    assert max(_cached(bob) for _ in range(2)) > 0
    chat = alice.chat.completions.create(model="zeroc-tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2, temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_a_call_without_a_known_key_is_401_and_health_needs_none(secured):
    with pytest.raises(openai.AuthenticationError) as err:
        _api(secured, "mallory-key").completions.create(model="zeroc-tiny", prompt="hi", max_tokens=1)
    assert err.value.body["code"] == "invalid_api_key"
    context = ssl.create_default_context(cafile=str(secured.pki.ca))
    for path in ("/v1/models", "/tokenize", "/v1/chat/completions"):
        status, body = _http(secured.gateway + path, context, body=None if path == "/v1/models" else {"prompt": "hi"})
        assert status == 401 and body["error"]["type"] == "authentication_error", path  # no Authorization
    status, health = _http(secured.gateway + "/health", context)  # the gateway's own key asks the decode service
    assert status == 200 and all(health["replicas"].values())
    with urllib.request.urlopen(secured.gateway + "/ping", timeout=30, context=context) as reply:  # liveness
        assert reply.status == 200
    assert _http(secured.gateway + "/v1/models", context, key="bob-key")[0] == 200


def _http(url: str, context: ssl.SSLContext, body: dict | None = None, key: str = "") -> tuple[int, dict]:
    """(status, JSON body) of a GET, or a POST of `body`, over HTTPS verified by `context`."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
