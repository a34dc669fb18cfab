"""A ZeroC-compressed model served through the disaggregated stack: same greedy output as direct
generation, and the KV shipped per prompt token shrinks by the rank ratio (uniform ranks, per-KV-head
ranks, and per-KV-head ranks with a token tier)."""

from __future__ import annotations

import pytest

from zeroc.client import Client
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import SamplingParams
from stacks import disaggregated, kv_dims

PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())", "A list comprehension is"]


@pytest.fixture(scope="module", params=["uniform", "per-head"])
def compressed_stack(request):
    """Prefill + decode services of the bundled model folded to rank 32 of 64 (KV budget 0.5), or with
    per-KV-head ranks in four layers (`zeroc_heads_dir`, KV budget 0.375)."""
    model_dir = request.getfixturevalue("zeroc_half_dir" if request.param == "uniform" else "zeroc_heads_dir")
    for address in disaggregated(model_dir):
        yield model_dir, address


def test_compressed_disaggregated_equals_direct_and_ships_its_budget_of_bytes(compressed_stack, bundled):
    model_dir, decode = compressed_stack
    loaded = load_model(model_dir)
    direct = Engine(loaded, CacheConfig()).generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
    cfg = bundled.config
    full_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 K and V
    # the ranks summed over every layer and KV head, independently of the cache's geometry
    dims = kv_dims(loaded.config)
    assert dims * 4 / full_per_token == loaded.config.compression.budget
    with Client(decode) as client:
        assert client.model_info().fingerprint
        for prompt, want in zip(PROMPTS, direct):
            got = client.generate(prompt, max_tokens=8, ignore_eos=True)
            assert got.token_ids == want.token_ids
            n = len(want.prompt_token_ids)
            assert got.usage.kv_bytes_received == (n - 1) * dims * 4


@pytest.fixture(scope="module")
def tier_stack(zeroc_tier_dir):
    """Prefill + decode services of a compressed model that keeps a token tier (2 sinks, 8 recent)."""
    for address in disaggregated(zeroc_tier_dir, {"ZEROC_TRANSFER_CHUNK_BYTES": "4096"}):
        yield zeroc_tier_dir, address


def test_a_token_tier_served_disaggregated_equals_direct_and_ships_its_tier_rows(tier_stack):
    """The prompt's compressed rows for every token plus the tier's extra rows for its sinks and last 8
    tokens travel; the decode service continues exactly as a local engine does."""
    model_dir, decode = tier_stack
    loaded = load_model(model_dir)
    from zeroc.policies.tier import tier_policy

    cfg, policy = loaded.config, tier_policy(loaded.config)
    dims = kv_dims(cfg)
    full_dims = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    prompts = PROMPTS + ["def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints the sum of two numbers"]
    direct = Engine(loaded, CacheConfig()).generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert max(len(r.prompt_token_ids) for r in direct) > 2 * (policy.sinks + policy.recent)  # the ring wraps
    with Client(decode) as client:
        for prompt, want in zip(prompts, direct):
            got = client.generate(prompt, max_tokens=12, ignore_eos=True)
            assert got.token_ids == want.token_ids
            n = len(want.prompt_token_ids) - 1  # the decode service runs the last prompt token itself
            tier_tokens = min(n, policy.sinks + policy.recent)
            # every token's compressed row, and the tier's tokens at full width (fp32)
            want_bytes = 4 * (n * dims + tier_tokens * (full_dims - dims))
            assert got.usage.kv_bytes_received == want_bytes
        assert client.model_info().fingerprint  # still serving
