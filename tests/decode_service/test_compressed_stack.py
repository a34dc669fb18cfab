"""A ZeroC-compressed model served through the disaggregated stack: same greedy output as direct
generation, and the KV shipped per prompt token shrinks by the rank ratio."""

from __future__ import annotations

import pytest

from zeroc.client import Client
from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import BUNDLED_CALIB, AttentionCompression, CacheConfig
from zeroc.engine import Engine
from zeroc.evaluate import read_eval_tokens
from zeroc.loader import load_model, save_model
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())", "A list comprehension is"]


@pytest.fixture(scope="module")
def compressed_stack(bundled, tmp_path_factory):
    """The bundled model folded to rank 32 of 64 for Q/K and V in every layer (KV budget 0.5)."""
    from zeroc.stack import ServiceProcess

    calib = read_eval_tokens(bundled.tokenizer, BUNDLED_CALIB, 2048)[:2048].view(4, 512)
    factors = compute_factors(bundled.model, collect_statistics(bundled.model, calib, progress=False))
    layout = AttentionCompression(tuple(f.layer_compression(32, 32) for f in factors), "test-uniform-32", 0.5)
    out = save_model(build_compressed(bundled.model, factors, layout), bundled.tokenizer,
                     tmp_path_factory.mktemp("zeroc-0.5") / "model")
    procs = []
    try:
        procs.append(ServiceProcess("prefill", ["--model", str(out)]))
        procs.append(ServiceProcess("decode", ["--model", str(out), "--prefill", procs[0].address]))
        for p in procs:
            p.wait_serving()
        yield out, procs[1].address
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
