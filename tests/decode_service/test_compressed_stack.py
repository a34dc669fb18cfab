"""A ZeroC-compressed model served through the disaggregated stack: same greedy output as direct
generation, and the KV shipped per prompt token shrinks by the rank ratio."""

from __future__ import annotations

import pytest

from zeroc.client import Client
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())", "A list comprehension is"]


@pytest.fixture(scope="module")
def compressed_stack(zeroc_half_dir):
    """Prefill + decode services of the bundled model folded to rank 32 of 64 (KV budget 0.5)."""
    from zeroc.stack import ServiceProcess

    procs = []
    try:
        procs.append(ServiceProcess("prefill", ["--model", zeroc_half_dir]))
        procs.append(ServiceProcess("decode", ["--model", zeroc_half_dir, "--prefill", procs[0].address]))
        for p in procs:
            p.wait_serving()
        yield zeroc_half_dir, procs[1].address
    finally:
        for p in procs:
            p.stop()


def test_compressed_disaggregated_equals_direct_and_ships_half_the_bytes(compressed_stack, bundled):
    model_dir, decode = compressed_stack
    loaded = load_model(model_dir)
    direct = Engine(loaded, CacheConfig()).generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
    cfg = bundled.config
    full_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 K and V
    with Client(decode) as client:
        assert client.model_info().fingerprint
        for prompt, want in zip(PROMPTS, direct):
            got = client.generate(prompt, max_tokens=8, ignore_eos=True)
            assert got.token_ids == want.token_ids
            n = len(want.prompt_token_ids)
            assert got.usage.kv_bytes_received * 2 == (n - 1) * full_per_token
