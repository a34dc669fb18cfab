"""int8 in the paged serving cache: equal to the streaming evaluator (also on a ZeroC model), bytes by
hand, and a prompt's KV from a prefill worker encoded on arrival."""

from __future__ import annotations

import pytest
import torch

from serving_runs import decode_landed, land_prompt, policy_cache, serve, stream
from test_kivi_serving import BUNDLED, GREEDY
from zeroc.config import CacheConfig
from zeroc.engine import Engine
from zeroc.kv_cache import LayerShape, PagedKVCache, block_bytes
from zeroc.loader import load_model
from zeroc.policies import Int8
from zeroc.serving_policies import Int8Serving


@pytest.fixture(scope="module")
def zeroc_half(zeroc_half_dir):
    return load_model(zeroc_half_dir)


@pytest.mark.parametrize("model_name,prompt,chunks", [
    ("bundled", 40, [[40], [13, 1, 26]]),  # prompt chunks that start and end inside blocks
    ("zeroc_half", 37, [[37], [16, 21]]),  # stacked on ZeroC: the rows are the compressed widths (32)
])
def test_serving_equals_the_streaming_evaluator(request, heldout_ids, model_name, prompt, chunks):
    loaded = request.getfixturevalue(model_name)
    ids, steps = heldout_ids[:prompt], 8
    want_logits, want_tokens = stream(loaded.model, Int8(), ids, steps)
    plain, _ = serve(loaded.model, policy_cache(loaded, block_size=16, num_blocks=16), ids, steps, [prompt])
    gap = (want_logits - plain).abs().max()  # how far int8 moves the logits
    assert gap > 1e-4
    for split in chunks:
        cache = policy_cache(loaded, block_size=16, num_blocks=16, kv_policy="int8")
        logits, tokens = serve(loaded.model, cache, ids, steps, split)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        assert (logits - want_logits).abs().max() < gap / 100  # serving is int8, not plain attention
        assert tokens == want_tokens


def test_block_bytes_and_blocks_per_budget_by_hand():
    # Per layer and token: 2 heads x (64 + 64) int8 codes + 2 heads x 2 fp32 scales = 272 bytes.
    assert Int8Serving().block_bytes(BUNDLED, 16, torch.float32) == 6 * 16 * 272
    half = [LayerShape(2, 32, 32)] * 6  # ZeroC at rank 32: 2 x 64 + 2 x 2 x 4 = 144 bytes
    assert Int8Serving().block_bytes(half, 16, torch.float32) == 6 * 16 * 144
    budget = 1 << 20
    cache = PagedKVCache(BUNDLED, CacheConfig(block_size=16, num_bytes=budget, kv_policy="int8"), torch.bfloat16)
    assert cache.num_blocks == budget // (6 * 16 * 272)
    assert sum(a.numel() for a in cache.store.arenas) == cache.num_blocks * 6 * 16 * 272
    # bf16 plain: 16 x 6 x 2 x 128 x 2 = 49152 bytes a block, int8 26112: 1.88x the tokens per byte
    assert block_bytes(BUNDLED, 16, torch.bfloat16) / Int8Serving().block_bytes(BUNDLED, 16, torch.bfloat16) \
        == pytest.approx(49152 / 26112)


def test_kv_from_an_int8_prefill_lands_encoded_and_decodes_like_colocated(zeroc_half, heldout_ids):
    cfg = CacheConfig(block_size=16, num_blocks=32, kv_policy="int8")
    ids = heldout_ids[:45]
    direct = Engine(zeroc_half, cfg).generate([ids], GREEDY)[0]
    engine = Engine(zeroc_half, cfg)
    land_prompt(zeroc_half, engine, cfg, ids)
    assert engine.cache.num_blocks - engine.cache.num_free_blocks == 3  # 44 tokens, nothing borrowed
    assert decode_landed(engine, ids, GREEDY) == direct.token_ids
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_int8_takes_no_kivi_or_h2o_settings():
    with pytest.raises(ValueError, match="does not apply to int8"):
        CacheConfig(kv_policy="int8", kv_budget=0.5)
    with pytest.raises(ValueError, match="h2o only"):
        CacheConfig(kv_policy="int8", kv_max_tokens=8)
    with pytest.raises(ValueError, match="kivi-4 and kivi-2 only"):
        CacheConfig(kv_policy="int8", kv_residual=16)
