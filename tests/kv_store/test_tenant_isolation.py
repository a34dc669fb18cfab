"""Tenant isolation of the prefix cache, against real service processes with bearer tokens: the PIN attack
(another tenant probing `cached_prefix_tokens`, or fetching blocks whose ids it computed from a guessed
text) learns nothing; the operator's opt-in shares prefixes again."""

from __future__ import annotations

import time

import grpc
import pytest

from kv_store.hashing import block_ids, store_seed
from zeroc.client import Client, ClientError
from zeroc.config import BUNDLED_MODEL
from zeroc.kv_transfer import model_fingerprint
from zeroc.stack import ServiceProcess
from zeroc.v1 import kv_store_pb2 as kpb
from zeroc.v1 import kv_store_pb2_grpc

HEADER = list(range(300, 316))  # one block every prompt of the "application" starts with


def secret_prompt(pin: str) -> list[int]:
    """Block 0 the shared header, block 1 holds the PIN's digits, block 2 more text."""
    digits = [400 + int(d) for d in pin]
    return HEADER + digits + list(range(500, 512)) + list(range(600, 616))


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, embedded_redis):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("# token tenant\nalice-token alice\nmallory-token mallory\n")
    env = {"ZEROC_REDIS_URL": embedded_redis.url, "ZEROC_STORE_NAMESPACE": "tenants"}
    procs = []
    try:
        procs.append(ServiceProcess("prefill", [], env=env))
        procs.append(ServiceProcess("decode", ["--prefill", procs[0].address],
                                    env={**env, "ZEROC_SECURITY_TOKENS_FILE": str(tokens)}))
        procs.append(ServiceProcess("decode", ["--colocated"], env={
            "ZEROC_SECURITY_TOKENS_FILE": str(tokens), "ZEROC_SECURITY_SHARE_PREFIXES": "on"}))
        for p in procs:
            p.wait_serving()
        yield procs
    finally:
        for p in procs:
            p.stop()


def cached(target: str, token: str, prompt: list[int]) -> int:
    with Client(target, token=token) as c:
        return c.generate(prompt, max_tokens=1).usage.cached_prefix_tokens


def warm(target: str, token: str, prompt: list[int], want: int) -> None:
    """Send `prompt` as `token` until the cache serves `want` of its tokens (blocks publish asynchronously)."""
    deadline = time.monotonic() + 60
    while cached(target, token, prompt) != want:
        assert time.monotonic() < deadline, "the tenant's own prefix never came back from the cache"
        time.sleep(0.2)


def test_the_pin_attack_through_cached_prefix_tokens_and_fetch_blocks_fails(tenants, bundled):
    prefill, decode, _ = (p.address for p in tenants)
    alice = secret_prompt("4821")
    warm(decode, "alice-token", alice, 32)  # alice's own cache works: 2 full blocks of the 47 sent
    # Mallory's first probe finds nothing of alice's (not even the header every prompt shares) ...
    assert cached(decode, "mallory-token", secret_prompt("1111")) == 0
    warm(decode, "mallory-token", secret_prompt("2222"), 16)  # ... only her own header from now on
    # ... and her right guess looks exactly like a wrong one (it was 48 against 16 before isolation).
    assert cached(decode, "mallory-token", secret_prompt("4821")) == 16
    assert cached(decode, "mallory-token", secret_prompt("3333")) == 16
    # Block ids computed from the guessed text (the seed is public knowledge) find nothing on any holder.
    seed = store_seed(model_fingerprint(BUNDLED_MODEL), bundled.config, "float32", 16)
    guessed = block_ids(alice[:-1], 16, seed)
    for target in (prefill, decode):
        with grpc.insecure_channel(target) as channel:
            replies = list(kv_store_pb2_grpc.KvStoreServiceStub(channel).FetchBlocks(
                kpb.FetchBlocksRequest(block_ids=guessed, seed=seed), timeout=30))
        assert replies[0].header.num_blocks == 0 and len(replies) == 1


def test_calls_without_a_known_token_are_unauthenticated(tenants):
    decode = tenants[1].address
    for token in (None, "wrong-token"):
        with Client(decode, token=token) as c, pytest.raises(ClientError) as err:
            c.generate([5, 6, 7], max_tokens=1)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(decode, token=token) as c, pytest.raises(ClientError) as err:
            c.model_info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_an_operator_can_opt_into_shared_prefixes(tenants):
    shared = tenants[2].address
    prompt = secret_prompt("7777")
    warm(shared, "alice-token", prompt, 32)
    assert cached(shared, "mallory-token", prompt) == 32
