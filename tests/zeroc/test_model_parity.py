"""The runtime against Hugging Face transformers on the same checkpoint (fp32, max abs 1e-4)."""

from __future__ import annotations

import torch

from zeroc.config import BUNDLED_HELDOUT, CacheConfig
from zeroc.engine import Engine
from zeroc.kv_cache import PagedKVCache, layer_shapes
from zeroc.sampling import SamplingParams

TOL = 1e-4


def _prompts(tokenizer, n: int) -> list[list[int]]:
    """n prompts of mixed lengths (3 to ~200 tokens) cut from the held-out text."""
    ids = tokenizer.encode(BUNDLED_HELDOUT.read_text()[:200_000], add_special_tokens=False)
    out, pos = [], 0
    for i in range(n):
        length = 3 + (i * 37) % 200
        out.append([tokenizer.bos_id] + ids[pos: pos + length])
        pos += length
    return out


def _cache_for(loaded, blocks=256, block_size=16) -> PagedKVCache:
    c = loaded.config
    shapes = layer_shapes(c)
    return PagedKVCache(shapes, CacheConfig(block_size, blocks), torch.float32)


@torch.inference_mode()
def test_full_forward_matches_hf(any_model, hf_model_of):
    hf = hf_model_of(any_model.path)
    tokens = torch.randint(0, any_model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    ours = any_model.model(tokens)
    ref = hf(tokens).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL


@torch.inference_mode()
def test_ragged_prefill_then_token_by_token_decode_matches_hf(any_model, hf_model_of):
    """Prefill three sequences of different lengths in one step, then decode them together."""
    hf = hf_model_of(any_model.path)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, any_model.config.vocab_size, (n,), generator=gen) for n in (90, 17, 260)]
    ref = [hf(s[None]).logits[0] for s in seqs]  # [len, vocab] each
    cache = _cache_for(any_model)
    prefill = [40, 5, 200]
    batch = cache.schedule([(f"s{i}", n) for i, n in enumerate(prefill)])
    tokens = torch.cat([s[:n] for s, n in zip(seqs, prefill)])
    logits = any_model.model.forward_paged(tokens, batch.positions, batch, cache)
    rows = torch.split(logits, prefill)
    for r, ref_i, n in zip(rows, ref, prefill):
        assert (r - ref_i[:n]).abs().max().item() < TOL
    # Token by token: sequences leave the batch as they run out (continuous batching).
    pos = list(prefill)
    while any(p < len(s) for p, s in zip(pos, seqs)):
        live = [i for i, (p, s) in enumerate(zip(pos, seqs)) if p < len(s)]
        batch = cache.schedule([(f"s{i}", 1) for i in live])
        step = torch.stack([seqs[i][pos[i]] for i in live])
        out = any_model.model.forward_paged(step, batch.positions, batch, cache)
        for row, i in enumerate(live):
            assert (out[row] - ref[i][pos[i]]).abs().max().item() < TOL, (i, pos[i])
            pos[i] += 1
        for i in range(len(seqs)):
            if pos[i] == len(seqs[i]) and cache.seq_len(f"s{i}"):
                cache.free(f"s{i}")
    assert cache.num_free_blocks == cache.num_blocks


@torch.inference_mode()
def test_batched_greedy_generation_matches_hf(any_model, hf_model_of):
    """24 prompts of mixed lengths generated together equal HF's one-by-one greedy output."""
    hf = hf_model_of(any_model.path)
    prompts = _prompts(any_model.tokenizer, 24)
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(any_model, CacheConfig(block_size=16, num_blocks=512))
    results = engine.generate(prompts, params)
    for prompt, res in zip(prompts, results):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=any_model.config.eos_token_id,
                          pad_token_id=any_model.config.eos_token_id)[0, len(prompt):]
        assert res.token_ids == ref.tolist()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
