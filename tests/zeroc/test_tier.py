"""Token tier (zeroc/tier.py): sinks + recent window at full rank, two segments merged by log-sum-exp."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import AttentionCompression, CacheConfig
from zeroc.caches import paged_cache
from zeroc.kv_cache import layer_shapes
from zeroc.loader import load_model, save_model
from zeroc.attend import causal_attend
from zeroc_kernels.paged_attention import segment_attention
from zeroc.tier import CachedRows, TierLayer, tiered_chunk_attention, tier_kv_fraction, tier_masks, tiered_attention
from zeroc_kernels.sdpa import dense_lse_ref, sdpa_lse


def random_tokens(model, batch: int, length: int, seed: int) -> torch.Tensor:
    """[batch, length] token ids drawn uniformly from the model's vocabulary, reproducibly."""
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_segments_split_a_small_case_as_worked_by_hand():
    """6 tokens, 1 sink, recent window 2: query i sees key 0, keys i-1 and i at full rank, the rest compressed."""
    full, compressed = tier_masks(6, sinks=1, recent=2)
    # F: seen at full rank, C: seen compressed, .: not seen (the future)
    picture = ["F.....",
               "FF....",
               "FFF...",
               "FCFF..",
               "FCCFF.",
               "FCCCFF"]
    assert full.int().tolist() == [[int(c == "F") for c in row] for row in picture]
    assert compressed.int().tolist() == [[int(c == "C") for c in row] for row in picture]


def _qkv(gen, b=2, t=9, heads=4, kv=2, d=8, r_qk=4, r_v=3):
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q_full, k_full, v_full = rand(b, t, heads, d), rand(b, t, kv, d), rand(b, t, kv, d)
    # The compressed tensors are any narrower ones; v's dims are v_full's first r_v, as in the model.
    return rand(b, t, heads, r_qk), rand(b, t, kv, r_qk), v_full[..., :r_v], q_full, k_full, v_full


def test_merge_equals_one_softmax_over_the_concatenated_scores():
    """Each key scored at full rank (tier) or compressed (the rest), one softmax over all of them."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, q_full, k_full, v_full = _qkv(gen)
    out = tiered_attention(q, k, v, q_full, k_full, v_full, sinks=2, recent=3, scale=0.3)
    full_mask, compressed_mask = tier_masks(9, 2, 3)
    group = 2
    s_full = torch.einsum("bqhd,bkhd->bhqk", q_full, k_full.repeat_interleave(group, -2)) * 0.3
    s_comp = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, -2)) * 0.3
    scores = torch.where(full_mask, s_full, torch.where(compressed_mask, s_comp, float("-inf")))
    probs = scores.softmax(-1)  # [b, heads, T, T]
    values_full = v_full.repeat_interleave(group, -2)  # [b, T, heads, d]
    values_comp = F.pad(v, (0, 5)).repeat_interleave(group, -2)
    expected = (torch.einsum("bhqk,bkhd->bqhd", probs * full_mask, values_full)
                + torch.einsum("bhqk,bkhd->bqhd", probs * compressed_mask, values_comp))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_no_tier_is_compressed_attention_and_a_whole_window_tier_is_full_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v, q_full, k_full, v_full = _qkv(gen)
    none = tiered_attention(q, k, v, q_full, k_full, v_full, sinks=0, recent=0, scale=0.3)
    torch.testing.assert_close(none, F.pad(causal_attend(0, q, k, v, 0.3), (0, 5)), rtol=1e-6, atol=1e-6)
    whole = tiered_attention(q, k, v, q_full, k_full, v_full, sinks=0, recent=9, scale=0.3)
    torch.testing.assert_close(whole, causal_attend(0, q_full, k_full, v_full, 0.3), rtol=1e-6, atol=1e-6)
    sinks_only = tiered_attention(q, k, v, q_full, k_full, v_full, sinks=9, recent=0, scale=0.3)
    torch.testing.assert_close(sinks_only, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [1, 7, 70, 200])
@pytest.mark.parametrize("sinks, recent", [(4, 16), (0, 8), (3, 0), (2, 200), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompts_tiered_attention_by_segments_equals_the_dense_one(length, sinks, recent, dtype):
    """`tiered_chunk_attention`: the compressed segment as shifted causal attention (flash, or the reference),
    the full-rank one as blocked local attention, merged; windows wider than the prompt, no sinks, no window,
    prompts shorter than a block and several blocks long."""
    gen = torch.Generator().manual_seed(length + 10 * sinks + recent)
    dims = TierLayer(k_dim=24, v_dim=8, tier_k=8, tier_v=24)
    q = torch.randn(length, 4, 32, generator=gen).to(dtype)
    k = torch.randn(length, 2, 32, generator=gen).to(dtype)
    v = torch.randn(length, 2, 32, generator=gen).to(dtype)
    want = tiered_attention(q[None, ..., :24], k[None, ..., :24], v[None, ..., :8], q[None], k[None], v[None],
                            sinks, recent, 0.3)[0]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for causal in (sdpa_lse, dense_lse_ref):
        got = tiered_chunk_attention(q, k, v, dims, sinks, recent, 0.3, causal)
        assert got.shape == (length, 4, 32) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("start, length", [(9, 30), (3, 30), (70, 45), (100, 5), (150, 60)])
@pytest.mark.parametrize("sinks, recent", [(4, 16), (0, 8), (3, 0), (2, 200), (5, 1), (20, 3)])
def test_a_chunk_after_cached_rows_attends_as_the_dense_sequence_does(start, length, sinks, recent):
    """`tiered_chunk_attention` with `CachedRows`: every compressed key before start - W seen by every query,
    the rest causally, the sinks and the ring at full rank; against the whole sequence's dense tiered attention.
    Chunks starting inside the sinks, shorter than the window, far past it."""
    gen = torch.Generator().manual_seed(start + length + sinks + recent)
    dims, total = TierLayer(k_dim=24, v_dim=8, tier_k=8, tier_v=24), start + length
    q, k, v = (torch.randn(total, h, 32, generator=gen) for h in (4, 2, 2))
    want = tiered_attention(q[None, ..., :24], k[None, ..., :24], v[None, ..., :8], q[None], k[None], v[None],
                            sinks, recent, 0.3)[0, start:]
    ring = slice(max(sinks, start - recent), start) if start > sinks else slice(0, 0)
    cached = CachedRows(start, k[sinks:start, :, :24], v[sinks:start, :, :8], k[: min(sinks, start)],
                        v[: min(sinks, start)], k[ring], v[ring])
    for attend in (sdpa_lse, dense_lse_ref):
        got = tiered_chunk_attention(q[start:], k[start:], v[start:], dims, sinks, recent, 0.3, attend, cached)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_query_without_keys_in_a_segment_gets_no_weight_from_it():
    gen = torch.Generator().manual_seed(2)
    q, k, v, *_ = _qkv(gen)
    _, compressed = tier_masks(9, 1, 2)
    out, lse = segment_attention(q, k, v, compressed, 0.3)
    assert torch.isinf(lse[:, :3]).all() and (out[:, :3] == 0).all() and torch.isfinite(lse[:, 3:]).all()


def _layout(factors, cfg, mode, sinks=0, recent=0):
    d = cfg.head_dim
    layers = tuple(f.layer_compression(d // 2, d // 4, mode) for f in factors)
    return AttentionCompression(layers, "tier-test", 0.375, f"zeroc-{mode}", sinks, recent)


@pytest.fixture(scope="module")
def factors_of():
    cache = {}

    def get(loaded):
        if id(loaded) not in cache:
            model = loaded.model
            calib = random_tokens(model, 2, 128, seed=3)
            cache[id(loaded)] = compute_factors(model, collect_statistics(model, calib, progress=False,
                                                                          sample_tokens=128))
        return cache[id(loaded)]

    return get


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["fold", "rotate"])
def test_a_tier_covering_the_context_is_the_uncompressed_model(any_model, factors_of, mode):
    """Q/K at half rank and V at a quarter, but every token inside the recent window: full rank throughout."""
    model, factors = any_model.model, factors_of(any_model)
    tokens = random_tokens(model, 2, 96, seed=4)
    tiered = build_compressed(model, factors, _layout(factors, model.config, mode, sinks=0, recent=96))
    assert (tiered(tokens) - model(tokens)).abs().max().item() < 1e-4


@torch.inference_mode()
def test_a_partial_tier_matches_the_full_model_inside_the_window_and_is_compressed_beyond(bundled, factors_of):
    model, factors = bundled.model, factors_of(bundled)
    tokens = random_tokens(model, 1, 96, seed=5)
    plain = build_compressed(model, factors, _layout(factors, model.config, "fold"))
    tiered = build_compressed(model, factors, _layout(factors, model.config, "fold", sinks=4, recent=16))
    full, compressed, mixed = model(tokens), plain(tokens), tiered(tokens)
    assert (mixed[:, :16] - full[:, :16]).abs().max().item() < 1e-4  # query i < 16 sees only full-rank keys
    late = lambda x: F.cross_entropy(x[0, 16:-1], tokens[0, 17:]).item()  # noqa: E731
    assert (mixed[:, 16:] - full[:, 16:]).abs().max().item() > 1e-2  # older keys are compressed
    assert abs(late(mixed) - late(full)) < abs(late(compressed) - late(full))


@torch.inference_mode()
def test_no_tier_is_the_plain_compressed_model(bundled, factors_of):
    model, factors = bundled.model, factors_of(bundled)
    tokens = random_tokens(model, 1, 64, seed=6)
    plain = build_compressed(model, factors, _layout(factors, model.config, "rotate"))
    zero = build_compressed(model, factors, _layout(factors, model.config, "rotate", sinks=0, recent=0))
    assert not any(name.startswith("tier_") for name, _ in zero.model.layers[0].self_attn.named_children())
    assert torch.equal(zero(tokens), plain(tokens))


@torch.inference_mode()
def test_tiered_checkpoint_round_trips_and_runs_only_with_its_tier(random_gqa, factors_of, tmp_path):
    model, factors = random_gqa.model, factors_of(random_gqa)
    tiered = build_compressed(model, factors, _layout(factors, model.config, "fold", sinks=2, recent=8))
    out = save_model(tiered, random_gqa.tokenizer, tmp_path / "tiered")
    loaded = load_model(out)
    assert (loaded.config.compression.sinks, loaded.config.compression.recent) == (2, 8)
    tokens = random_tokens(model, 1, 40, seed=7)
    assert torch.equal(loaded.model(tokens), tiered(tokens))
    # A cache built without the model has no room for the tier's rows (zeroc/policies/tier.py).
    cache = paged_cache(layer_shapes(loaded.config), CacheConfig(block_size=16, num_blocks=4), torch.float32)
    batch = cache.schedule([("s", 3)])
    with pytest.raises(ValueError, match="paged_cache"):
        loaded.model.forward_paged(tokens[0, :3], batch.positions, batch, cache)
    positions = torch.arange(40)[None]
    with pytest.raises(ValueError, match="not KV-cache policies"):  # a caller's own attention cannot hold the tier
        loaded.model.forward_attend(tokens, positions, lambda *args: causal_attend(*args))
    with pytest.raises(ValueError, match="does not combine with a model that keeps a token tier"):
        paged_cache(layer_shapes(loaded.config), CacheConfig(block_size=32, num_blocks=4, kv_policy="kivi-4"),
                     torch.float32, model=loaded.model)
    ppl = subprocess.run([sys.executable, "-m", "zeroc.cli", "eval", "ppl", "--model", str(out), "--ctx", "32",
                          "--max-tokens", "64", "--streaming", "--kv-policy", "h2o", "--kv-budget", "0.5"],
                         capture_output=True, text=True, timeout=300)
    assert ppl.returncode == 2 and "token tier" in ppl.stderr and "Traceback" not in ppl.stderr


@pytest.mark.parametrize("mode", ["fold", "rotate"])
def test_kv_fraction_counts_the_tier_rows(random_gqa, factors_of, mode):
    cfg = build_compressed(random_gqa.model, factors_of(random_gqa),
                           _layout(factors_of(random_gqa), random_gqa.config, mode, sinks=4, recent=60)).config
    # Q/K at d/2 and V at d/4: 0.375 of the bytes; 64 tier tokens of 1024 pay the other 0.625 (rotate too:
    # its tier keeps the bases' complement, d/2 dims, not the whole key).
    assert tier_kv_fraction(cfg, 1024) == pytest.approx(0.375 + 64 / 1024 * 0.625)
    assert tier_kv_fraction(cfg, 32) == pytest.approx(1.0)  # the tier covers the whole context


@pytest.mark.parametrize("sinks, recent, name", [(-1, 0, "sinks"), (0, -4, "recent"), (1.5, 0, "sinks")])
def test_invalid_tier_sizes_are_clear_errors(random_gqa, factors_of, sinks, recent, name):
    with pytest.raises(ValueError, match=f"{name} must be a non-negative integer"):
        _layout(factors_of(random_gqa), random_gqa.config, "fold", sinks, recent)
