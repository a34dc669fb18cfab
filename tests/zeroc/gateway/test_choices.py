"""zeroc/gateway/choices.py against real decode services: a prompt's choices share its KV through the KV store."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from zeroc.gateway.choices import choice_calls, open_all
from zeroc.gateway.replicas import Replicas, finish

BLOCK = 16  # the services' KV block size (CacheConfig's default)


@pytest.mark.parametrize("path", ["decode", "colocated"])
def test_a_prompts_other_choices_read_its_blocks_from_the_kv_store(services, path):
    """n = 3 on a prompt no one sent before: the first choice computes it; the other two open once it has its first
    token and take its full blocks from the KV store; every choice generates the same greedy tokens."""
    prompt = f"Request {uuid.uuid4().hex}: " + "the built-in function len returns the number of items. " * 4
    sampling = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "seed": None}

    async def run():
        replicas = Replicas([getattr(services, path)], timeout_s=60)
        try:
            calls = choice_calls(sampling, [prompt], 3, f"share-{uuid.uuid4().hex}")
            opened = await open_all(replicas, calls, n=3)
            return [await finish(first, stream) for first, stream in opened]
        finally:
            await replicas.close()

    results = asyncio.run(run())
    tokens = results[0].usage.prompt_tokens
    assert results[0].usage.cached_prefix_tokens == 0
    assert [r.usage.cached_prefix_tokens for r in results[1:]] == [(tokens - 1) // BLOCK * BLOCK] * 2
    assert results[1].token_ids == results[0].token_ids == results[2].token_ids and len(results[0].token_ids) == 4
