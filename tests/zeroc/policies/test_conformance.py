"""Every method of the registry, through the paged cache `zeroc serve` runs, on the small random GQA model:
at budget 1 it is the uncompressed cache; it holds no more than its byte budget; its logits are its dense
oracle's (tests/support/oracle); and KV landed from a prefill worker decodes as colocated serving does.

A method added to `zeroc.policies.registry` is checked here without a line of test code (it needs a dense
oracle in `oracle.oracle_of`)."""

from __future__ import annotations

import pytest
import torch

from oracle import oracle_of
from serving_runs import check_landed_is_colocated, serve, stream
from zeroc.caches import paged_cache, sequence_blocks
from zeroc.config import CacheConfig
from zeroc.kv_cache import layer_shapes
from zeroc.policies import POLICY_NAMES, REGISTRY, cache_config, make_policy, method_at_budget
from zeroc.policies.base import reference_bits
from zeroc.sampling import SamplingParams
from zeroc.transport.landing import check_transfer

PROMPT, STEPS, CHUNKS = 40, 4, [17, 1, 22]  # the prompt prefilled in uneven chunks, then greedy decode steps
# The budget each method is checked at (default 0.5): int8's bytes follow from its bits (0.5625 here); KIVI's
# average over 44 tokens is mostly its full-precision filling block.
BUDGET = {"int8": 0.6, "kivi-4": 0.9, "kivi-2": 0.9}
GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def _method(name: str, budget: float, loaded):
    return method_at_budget(name, budget, loaded.config, PROMPT + STEPS)


def _cache(loaded, method, num_blocks: int = 48):
    cfg = cache_config(method, num_blocks=num_blocks)
    return paged_cache(layer_shapes(loaded.config), cfg, torch.float32, model=loaded.model)


@pytest.fixture(scope="module")
def ids(random_gqa) -> list[int]:
    return torch.randint(3, random_gqa.config.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def plain(random_gqa, ids):
    cache = paged_cache(layer_shapes(random_gqa.config), CacheConfig(block_size=16, num_blocks=16), torch.float32)
    return serve(random_gqa.model, cache, ids, STEPS, CHUNKS)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_the_registry_round_trips_through_the_cache_settings(name):
    for budget in (1.0, 0.5):
        entry = REGISTRY[name]
        method = entry.method_class()(**entry.fixed, **({"budget": budget} if "kv_budget" in entry.takes else {}))
        assert make_policy(cache_config(method)) == method


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_at_budget_one_it_is_the_uncompressed_cache(random_gqa, ids, plain, name):
    method = _method(name, 1.0, random_gqa)
    logits, tokens = serve(random_gqa.model, _cache(random_gqa, method), ids, STEPS, CHUNKS)
    if name == "int8":  # it always quantises (its bytes follow from its bits): close, not equal
        assert (logits - plain[0]).abs().max() < 0.05 * plain[0].abs().max()
        return
    torch.testing.assert_close(logits, plain[0], atol=1e-4, rtol=1e-4)
    assert tokens == plain[1]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_it_holds_no_more_than_its_byte_budget(random_gqa, ids, name):
    budget, cfg = BUDGET.get(name, 0.5), random_gqa.config
    method = _method(name, budget, random_gqa)
    shapes, tokens = layer_shapes(cfg), PROMPT + STEPS
    assert method.held_bits(shapes, tokens) <= budget * reference_bits(cfg, tokens) + 1e-6
    cache = _cache(random_gqa, method)
    serve(random_gqa.model, cache, ids, STEPS, CHUNKS)
    # the blocks the sequence really took (borrowed ones included) are within what sizing reserves for it
    reserved = sequence_blocks(cfg, cache.block_size, tokens, cache_config(method), torch.float32)
    assert 0 < cache.num_blocks - cache.num_free_blocks <= reserved
    assert cache.policy.slots_for(tokens) <= tokens


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_cache_sized_for_chunked_prefill_holds_it(random_gqa, name):
    """`sequence_blocks(..., step=chunk)` reserves enough for a prompt prefilled `chunk` tokens a step, as
    `zeroc eval quality`'s prefill protocol and `zeroc eval longctx` size their caches: KIVI's blocks quantised
    during a step keep their full-precision rows until it ends, beside the tail the step adds."""
    cfg, prompt, chunk = random_gqa.config, 192, 64
    method = method_at_budget(name, BUDGET.get(name, 0.5), cfg, prompt)
    reserved = sequence_blocks(cfg, cache_config(method).block_size, prompt, cache_config(method), torch.float32,
                               step=chunk)
    cache = _cache(random_gqa, method, num_blocks=reserved)
    ids = torch.randint(3, cfg.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    serve(random_gqa.model, cache, ids, 1, [chunk] * (prompt // chunk))  # raises CacheFullError if it does not fit


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_serving_logits_are_the_dense_oracles(random_gqa, ids, plain, name):
    method = _method(name, BUDGET.get(name, 0.5), random_gqa)
    want_logits, want_tokens = stream(random_gqa.model, oracle_of(method), ids, STEPS)
    logits, tokens = serve(random_gqa.model, _cache(random_gqa, method), ids, STEPS, CHUNKS)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert tokens == want_tokens
    assert not torch.allclose(logits, plain[0], atol=1e-4, rtol=1e-4)  # the method changed something


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_disaggregated_equals_colocated(random_gqa, ids, name):
    method = _method(name, BUDGET.get(name, 0.5), random_gqa)
    cfg = cache_config(method, num_blocks=48)
    if not method.transferable:  # its kept set depends on queries the KV wire does not carry: refused up front
        with pytest.raises(ValueError, match="--colocated"):
            check_transfer(cfg)
        return
    check_landed_is_colocated(random_gqa, cfg, ids)
