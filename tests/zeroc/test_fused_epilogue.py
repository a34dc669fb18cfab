"""The Triton backend of `Transformer.forward_paged` (the fused QKV epilogue kernels, then paged attention)
against the torch backend, run on the CPU under TRITON_INTERPRET: uncompressed, fold and rotate layers; and
the KV-write seam: whatever writes the rows, the cache's listeners see the same ones."""

from __future__ import annotations

import shutil

import pytest
import torch

from zeroc.config import AttentionCompression, CacheConfig
from zeroc.caches import paged_cache
from zeroc.kv_cache import layer_shapes
from zeroc_kernels.attention import BACKENDS, select_backend


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


def _run(model, backend: str, cache_cfg: CacheConfig | None = None):
    """Two sequences: a ragged prefill (19 and 6 tokens), then a decode step, on `backend`.
    -> logits per step, cache, what a KV-write listener saw per layer (slots, k, v)"""
    cache = paged_cache(layer_shapes(model.config), cache_cfg or CacheConfig(16, 16), torch.float32, model=model)
    gen = torch.Generator().manual_seed(3)
    out, seen = [], {}
    saved, model.backend = model.backend, BACKENDS[backend]()
    try:
        with cache.listening(lambda layer, slots, k, v: seen.setdefault(layer, []).append((slots, k, v))):
            for lens in ([19, 6], [1, 1]):
                batch = cache.schedule([(f"s{i}", n) for i, n in enumerate(lens)])
                tokens = torch.randint(0, model.config.vocab_size, (sum(lens),), generator=gen)
                out.append(model.forward_paged(tokens, batch.positions, batch, cache))
    finally:
        model.backend = saved
    return out, cache, seen


@torch.inference_mode()
@pytest.mark.parametrize("backend", ["triton", "torch-epilogue"])  # the kernels; the references in their places
@pytest.mark.parametrize("which", ["random_gqa", "fold+rotate"])  # uncompressed (GQA, llama3 RoPE); both modes
def test_fused_epilogue_path_equals_the_reference_path(which, backend, random_gqa, mixed_mode_model):
    model = {"random_gqa": random_gqa.model, "fold+rotate": mixed_mode_model}[which]
    ref, ref_cache, ref_seen = _run(model, "torch")
    got, got_cache, got_seen = _run(model, backend)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    for layer in range(model.config.num_hidden_layers):  # the epilogue wrote the same K/V slots
        for a, b in zip(got_cache.layer(layer), ref_cache.layer(layer)):
            used = slice(0, 4)  # 2 sequences x <= 2 blocks; the rest was never written by either path
            torch.testing.assert_close(a[used], b[used], atol=1e-4, rtol=1e-4)
    # The KV-write seam: the kernel wrote the rows itself, and the listeners saw exactly those, per layer and step.
    assert sorted(got_seen) == sorted(ref_seen) == list(range(model.config.num_hidden_layers))
    for layer in ref_seen:
        assert len(got_seen[layer]) == len(ref_seen[layer]) == 2
        for (s1, k1, v1), (s2, k2, v2) in zip(got_seen[layer], ref_seen[layer]):
            assert torch.equal(s1, s2)
            torch.testing.assert_close(k1, k2, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v1, v2, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_a_policy_cache_takes_the_store_path_on_every_backend(bundled):
    """A KV policy's store encodes K/V itself: the fused epilogue is not taken, and the result is the torch
    backend's."""
    cfg = CacheConfig(32, 32, kv_policy="kivi-4")
    ref, _, ref_seen = _run(bundled.model, "torch", cfg)
    got, _, got_seen = _run(bundled.model, "triton", cfg)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [len(got_seen[i]) for i in got_seen] == [len(ref_seen[i]) for i in ref_seen] == [2] * len(ref_seen)


def test_backend_selection():
    # the ragged C++ kernel where a compiler can build it, else the references
    assert select_backend("auto", "cpu").name == ("cpu" if shutil.which("c++") else "torch")
    assert select_backend("torch", "cpu").name == "torch"
    assert select_backend("triton", "cpu").name == "triton"  # TRITON_INTERPRET=1 in the test suite
    with pytest.raises(ValueError, match="unknown attention backend 'cuda-magic'"):
        select_backend("cuda-magic", "cpu")
