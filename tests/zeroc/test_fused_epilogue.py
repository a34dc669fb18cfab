"""The CUDA path of `Transformer.forward_paged` (the fused QKV epilogue kernels, then paged attention)
against the PyTorch path, run on the CPU under TRITON_INTERPRET: uncompressed, fold and rotate layers."""

from __future__ import annotations

import pytest
import torch

from zeroc.config import AttentionCompression, CacheConfig
from zeroc.kv_cache import PagedKVCache, layer_shapes


@pytest.fixture(scope="module")
def mixed_mode_model(bundled):
    """The bundled model with Q/K rank 32 in every layer, layers alternating rotate and fold, V rank 16.

    Random orthonormal bases and pair orders (not calibrated): only the two paths' agreement is tested."""
    from zeroc.compression.fold import LayerFactors, build_compressed

    cfg = bundled.config
    d, kv = cfg.head_dim, cfg.num_key_value_heads
    gen = torch.Generator().manual_seed(0)
    orth = lambda: torch.linalg.qr(torch.randn(kv, d, d, generator=gen))[0]  # noqa: E731  [kv, d, d]
    factors = []
    for _ in range(cfg.num_hidden_layers):
        order = torch.stack([torch.randperm(d // 2, generator=gen) for _ in range(kv)])
        v = orth()
        factors.append(LayerFactors(order, v.transpose(1, 2), v, orth(), orth()))
    layers = tuple(f.layer_compression(32, 16, "rotate" if i % 2 == 0 else "fold") for i, f in enumerate(factors))
    return build_compressed(bundled.model, factors, AttentionCompression(layers, "test-mixed", 0.4))


def _run(model, fused: bool) -> tuple[list[torch.Tensor], PagedKVCache]:
    """Two sequences: a ragged prefill (19 and 6 tokens), then a decode step. -> logits per step, cache"""
    cache = PagedKVCache(layer_shapes(model.config), CacheConfig(16, 16), torch.float32)
    gen = torch.Generator().manual_seed(3)
    out = []
    for lens in ([19, 6], [1, 1]):
        batch = cache.schedule([(f"s{i}", n) for i, n in enumerate(lens)])
        tokens = torch.randint(0, model.config.vocab_size, (sum(lens),), generator=gen)
        out.append(model.forward_paged(tokens, batch.positions, batch, cache, fused=fused))
    return out, cache


@torch.inference_mode()
@pytest.mark.parametrize("which", ["random_gqa", "fold+rotate"])  # uncompressed (GQA, llama3 RoPE); both modes
def test_fused_epilogue_path_equals_the_reference_path(which, random_gqa, mixed_mode_model):
    model = {"random_gqa": random_gqa.model, "fold+rotate": mixed_mode_model}[which]
    ref, ref_cache = _run(model, fused=False)
    got, got_cache = _run(model, fused=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    for layer in range(model.config.num_hidden_layers):  # the epilogue wrote the same K/V slots
        for a, b in zip(got_cache.layer(layer), ref_cache.layer(layer)):
            used = slice(0, 4)  # 2 sequences x <= 2 blocks; the rest was never written by either path
            torch.testing.assert_close(a[used], b[used], atol=1e-4, rtol=1e-4)


def test_fused_path_refuses_a_policy_cache(bundled):
    cache = PagedKVCache(layer_shapes(bundled.config), CacheConfig(32, 8, kv_policy="kivi-4"), torch.float32)
    batch = cache.schedule([("s", 4)])
    with pytest.raises(ValueError, match="KV policy"):
        bundled.model.forward_paged(torch.arange(4), batch.positions, batch, cache, fused=True)
