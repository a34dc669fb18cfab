"""How the gateway picks a decode service (zeroc/gateway/replicas.py): rendezvous hashing of the prompt's prefix
keeps a prefix on one replica, moves few prefixes when a replica comes or goes, spreads distinct prefixes, and
passes over a replica much busier than the rest; through a real gateway, the requests that share a prefix land on
one decode service (its KV-store lookups count them)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from gateway_support import start_gateway
from zeroc.client import Client
from zeroc.gateway.replicas import PREFIX_CHARS, PREFIX_TOKENS, Replicas, prefix_key, rendezvous

TARGETS = [f"10.0.0.{i}:50051" for i in range(1, 6)]


def test_rendezvous_spreads_keys_and_moves_only_those_of_a_removed_target():
    rng = random.Random(0)
    keys = [bytes(rng.randrange(256) for _ in range(24)) for _ in range(2000)]
    first = {k: TARGETS[rendezvous(k, TARGETS)[0]] for k in keys}
    shares = Counter(first.values())
    assert set(shares) == set(TARGETS) and all(250 <= n <= 550 for n in shares.values()), shares
    fewer = TARGETS[:2] + TARGETS[3:]  # one removed: only its keys move
    moved = [k for k in keys if fewer[rendezvous(k, fewer)[0]] != first[k]]
    assert moved and all(first[k] == TARGETS[2] for k in moved)
    assert rendezvous(keys[0], TARGETS) == rendezvous(keys[0], list(TARGETS))  # a function of key and targets


def test_the_key_is_the_prompts_prefix():
    assert prefix_key("a" * PREFIX_CHARS + "x") == prefix_key("a" * PREFIX_CHARS + "y") != prefix_key("b")
    ids = list(range(PREFIX_TOKENS))
    assert prefix_key(ids + [1]) == prefix_key(ids + [2]) != prefix_key(ids[:-1])
    assert prefix_key("1") != prefix_key([1])


def test_a_prefix_keeps_its_replica_until_it_is_much_busier_than_the_rest():
    asyncio.run(_orders())


async def _orders() -> None:  # in a loop: the SDK's clients make their channels in one
    replicas = Replicas(TARGETS, timeout_s=5, routing="prefix", slack=2)
    try:
        order = replicas.order("shared system prompt " * 80)
        assert replicas.order("shared system prompt " * 80 + "another question") == order
        replicas.busy[order[0]] = 3  # busier than the least busy (0) by more than the slack
        assert replicas.order("shared system prompt " * 80)[-1] == order[0]
        replicas.busy[order[0]] = 2
        assert replicas.order("shared system prompt " * 80)[0] == order[0]
        turns = Replicas(TARGETS, timeout_s=5)  # round robin: each call starts one further on
        assert [turns.order("x")[0] for _ in range(6)] == [0, 1, 2, 3, 4, 0]
        await turns.close()
        with pytest.raises(ValueError, match="routing must be one of round_robin, prefix"):
            Replicas(TARGETS, timeout_s=5, routing="random")
    finally:
        await replicas.close()


def test_requests_sharing_a_prefix_land_on_one_decode_service(services):
    """Through a gateway routing by prefix over the disaggregated and the colocated decode service."""
    targets = [services.decode, services.colocated]
    gw = start_gateway(*targets, args=("--routing", "prefix"))
    try:
        for topic in ("list comprehensions", "the with statement"):
            shared = f"You answer questions about {topic} in Python. " * 40  # past PREFIX_CHARS
            before = [_lookups(t) for t in targets]
            for question in ("What is it?", "Show an example.", "When is it used?"):
                status, _ = gw.post("/v1/completions", {"prompt": shared + question, "max_tokens": 2})
                assert status == 200
            grew = sorted(_lookups(t) - b for t, b in zip(targets, before))
            assert grew[0] == 0 and grew[1] >= 3, (topic, grew)  # one service looked every prompt up
    finally:
        gw.process.stop()


def _lookups(target: str) -> int:
    with Client(target, timeout=30) as client:
        return client.model_info().kv_store.lookups
