"""Per-KV-head ranks: runs, the cache row, and the compressed model against independent oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroc.compression.fold import build_compressed
from zeroc.config import AttentionCompression, CacheConfig
from zeroc.engine import Engine
from zeroc.eval.perplexity import perplexity_full, perplexity_streaming
from zeroc.head_ranks import HeadLayout, HeadRun
from zeroc.caches import paged_cache
from zeroc.kv_cache import layer_shapes
from zeroc.loader import load_model
from zeroc.attend import causal_attend
from zeroc_kernels.attention import TorchBackend, TritonBackend
from zeroc.sampling import SamplingParams


def test_runs_are_the_maximal_spans_of_heads_with_equal_ranks():
    layout = HeadLayout.of((24, 24, 40, 24), (8, 8, 8, 16), group=3)
    assert layout.runs == (HeadRun(0, 2, 24, 8), HeadRun(2, 3, 40, 8), HeadRun(3, 4, 24, 16))


def test_one_kv_head_over_the_cache_row_attends_as_each_run_at_its_own_width():
    """The form KV-policy stores see (queries zero outside their group's dims, one KV head of the row's
    width) gives every head what a GQA attention of its own run gives."""
    gen = torch.Generator().manual_seed(0)
    layout = HeadLayout.of((16, 16, 8), (4, 12, 12), group=2)
    qs = [torch.randn(2, 5, r.heads * 2, r.qk, generator=gen) for r in layout.runs]
    ks = [torch.randn(2, 5, r.heads, r.qk, generator=gen) for r in layout.runs]
    vs = [torch.randn(2, 5, r.heads, r.v, generator=gen) for r in layout.runs]
    want = [causal_attend(0, q, k, v, 0.3) for q, k, v in zip(qs, ks, vs)]
    q_row = layout.queries(qs)
    assert q_row.shape == (2, 5, 6, 16 + 16 + 8)
    assert torch.count_nonzero(q_row[..., 0:2, 16:]) == 0  # head 0's group reads only its own key dims
    out = causal_attend(0, q_row, layout.rows(ks), layout.rows(vs), 0.3)
    for got, w in zip(layout.outputs(out, [r.v for r in layout.runs]), want):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=0)


def test_two_segments_of_the_row_scatter_and_gather_head_by_head():
    """A token tier's row: every head's compressed dims, then every head's tier dims. One scatter places each
    query head's dims of both segments where a head-by-head copy does; one gather reads each head's outputs
    from either segment, at any leading shape."""
    gen = torch.Generator().manual_seed(1)
    layout = HeadLayout.of((16, 16, 8), (4, 12, 12), group=2)
    comp = [torch.randn(3, r.heads * 2, r.qk, generator=gen) for r in layout.runs]
    tier = [torch.randn(3, r.heads * 2, 64 - r.qk, generator=gen) for r in layout.runs]
    want = torch.zeros(3, 6, 40 + 48 + 48 + 56)  # three runs of one head: Q/K ranks 16, 16, 8
    col = 0
    for parts in (comp, tier):
        for r, p in zip(layout.runs, parts):
            for i in range(r.heads):
                g, w = r.start + i, p.shape[-1]
                want[:, g * 2:(g + 1) * 2, col:col + w] = p[:, i * 2:(i + 1) * 2]
                col += w
    torch.testing.assert_close(layout.queries(comp, tier), want, atol=0, rtol=0)
    torch.testing.assert_close(layout.queries(comp), want[..., :40], atol=0, rtol=0)
    # outputs: value dims 4, 12, 12 per head, then tier value dims 60, 52, 52
    out = torch.randn(3, 6, 28 + 164, generator=gen)
    for widths, start in (([4, 12, 12], 0), ([60, 52, 52], 28)):
        got, col = layout.outputs(out, widths, start=start), start
        for r, part, w in zip(layout.runs, got, widths):
            assert part.shape == (3, r.heads * 2, w)
            for i in range(r.heads):
                g = r.start + i
                torch.testing.assert_close(part[:, i * 2:(i + 1) * 2], out[:, g * 2:(g + 1) * 2, col:col + w])
                col += w


def _zeroed_uniform(bundled, factors, qk: tuple[int, int], v: tuple[int, int], mode: str):
    """The oracle: a uniform layout at the larger ranks whose narrower head has its extra Q/K and V dims
    zeroed in the weights (how the ZeroC authors' code simulates a cut, saving nothing)."""
    model = build_compressed(bundled.model, factors, AttentionCompression(
        tuple(f.layer_compression(max(qk), max(v), mode) for f in factors), "oracle", 0.5))
    r, rv = max(qk), max(v)
    for layer, f in zip(model.model.layers, factors):
        attn = layer.self_attn
        for g in range(2):
            if mode == "rotate":
                attn.k_basis[g, :, qk[g]:] = 0
            else:  # the uniform head keeps order[:r/2], laid out [first halves | second halves]
                kept = sorted(f.pair_order[g][: r // 2].tolist())
                narrow = set(f.pair_order[g][: qk[g] // 2].tolist())
                for j, pair in enumerate(kept):
                    if pair not in narrow:
                        attn.k_proj.weight[g * r + j] = 0
                        attn.k_proj.weight[g * r + j + r // 2] = 0
            attn.v_proj.weight[g * rv + v[g]: (g + 1) * rv] = 0
    return model


@pytest.mark.parametrize("mode", ["fold", "rotate"])
@torch.inference_mode()
def test_per_head_ranks_equal_the_uniform_layer_with_the_narrower_heads_dims_zeroed(bundled, bundled_factors, mode):
    qk, v = (24, 40), (16, 8)
    layout = AttentionCompression(tuple(f.layer_compression(qk, v, mode) for f in bundled_factors), "heads", 0.5)
    model = build_compressed(bundled.model, bundled_factors, layout)
    assert layer_shapes(model.config)[0].kv_heads == 1 and layer_shapes(model.config)[0].k_dim == 64
    tokens = torch.randint(0, bundled.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    want = _zeroed_uniform(bundled, bundled_factors, qk, v, mode)(tokens)
    torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def heads(zeroc_heads_dir):
    return load_model(zeroc_heads_dir)


def test_the_cache_holds_exactly_each_heads_ranks(heads, bundled):
    cfg = heads.config
    cache = Engine(heads, CacheConfig(16, 32)).cache
    held = sum(k[0, 0].numel() + v[0, 0].numel() for k, v in zip(cache.k_pools, cache.v_pools))  # one token
    assert held == sum(sum(qk) + sum(v) for qk, v in map(cfg.head_ranks, range(cfg.num_hidden_layers)))
    full = Engine(bundled, CacheConfig(16, 32)).cache
    assert held / sum(k[0, 0].numel() + v[0, 0].numel() for k, v in zip(full.k_pools, full.v_pools)) == 0.375
    assert [s.kv_heads for s in layer_shapes(cfg)] == [1, 2, 1, 1, 2, 1]


def test_per_head_ranks_round_trip_through_the_checkpoint(heads):
    layers = heads.config.compression.layers
    assert layers[0].qk_ranks(2) == (24, 40) and layers[0].v_ranks(2) == (8, 24) and layers[0].per_head
    assert layers[3].mode == "rotate" and layers[3].rotate_rank == (24, 40) and not layers[1].per_head
    assert heads.model.model.layers[3].self_attn.q_basis.shape == (2, 64, 40)


@torch.inference_mode()
def test_paged_serving_equals_the_dense_forward(heads):
    tokens = torch.randint(0, heads.config.vocab_size, (300,), generator=torch.Generator().manual_seed(2))
    stream = perplexity_streaming(heads.model, tokens, ctx=100, batch_size=2, progress=False)
    full = perplexity_full(heads.model, tokens, ctx=100, progress=False)
    assert abs(stream.perplexity - full.perplexity) / full.perplexity < 1e-5
    prompts = ["The built-in function", "import os\nprint(os.getcwd())", "A list"]
    results = Engine(heads, CacheConfig(16, 64)).generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    for res in results:  # batched, ragged prefill then decode == argmax of the dense forward
        ids = list(res.prompt_token_ids)
        for _ in range(6):
            ids.append(int(heads.model(torch.tensor([ids]))[0, -1].argmax()))
        assert res.token_ids == ids[len(res.prompt_token_ids):]


@torch.inference_mode()
def test_the_fused_epilogue_path_takes_per_head_layers_unfused(heads):
    """On CUDA the model hands uniform layers to the fused QKV epilogue; layers with per-KV-head ranks fall
    back to the unfused path layer by layer. Forced here on the CPU (Triton interpreter), both agree."""
    tokens = torch.randint(0, heads.config.vocab_size, (57,), generator=torch.Generator().manual_seed(5))
    logits = []
    saved = heads.model.backend
    for backend in (TritonBackend(), TorchBackend()):
        cache = paged_cache(layer_shapes(heads.config), CacheConfig(16, 16), torch.float32)
        batch = cache.schedule([("a", 40), ("b", 17)])
        heads.model.backend = backend
        try:
            logits.append(heads.model.forward_paged(tokens, batch.positions, batch, cache))
        finally:
            heads.model.backend = saved
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_a_tier_covering_the_context_with_per_head_ranks_is_the_uncompressed_model(bundled, bundled_factors):
    """Compressed + complement is the full-rank layer per head too: with the recent window over the whole
    context, the dense forward and the paged one (the tier store) equal the source model."""
    layers = tuple(f.layer_compression((24, 40), (16, 8), ("fold", "rotate")[i % 2])
                   for i, f in enumerate(bundled_factors))
    model = build_compressed(bundled.model, bundled_factors,
                             AttentionCompression(layers, "tier-heads", 0.375, "zeroc-auto", sinks=0, recent=128))
    tokens = torch.randint(0, bundled.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(3))
    want = bundled.model(tokens)
    torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=0)
    cache = paged_cache(layer_shapes(model.config), CacheConfig(16, 32), torch.float32, model=model)
    batch = cache.schedule([("s", 60)])  # a prefill chunk, then token by token
    rows = [model.forward_paged(tokens[0, :60], batch.positions, batch, cache)]
    for t in range(60, 100):
        batch = cache.schedule([("s", 1)])
        rows.append(model.forward_paged(tokens[0, t: t + 1], batch.positions, batch, cache))
    torch.testing.assert_close(torch.cat(rows), want[0], atol=1e-4, rtol=0)
    assert F.kl_div(F.log_softmax(torch.cat(rows), -1), F.log_softmax(want[0], -1), log_target=True,
                    reduction="batchmean") < 1e-6


@torch.inference_mode()
def test_a_tiered_model_with_per_head_ranks_serves_as_its_dense_forward(zeroc_tier_dir):
    """The tier store (compressed segment over one KV head of the row's width, full-rank segment over the
    sinks and window) against the dense forward's per-run two-segment attention, past the window."""
    loaded = load_model(zeroc_tier_dir)
    tokens = torch.randint(0, loaded.config.vocab_size, (240,), generator=torch.Generator().manual_seed(4))
    stream = perplexity_streaming(loaded.model, tokens, ctx=120, batch_size=2, progress=False)
    full = perplexity_full(loaded.model, tokens, ctx=120, progress=False)
    assert abs(stream.perplexity - full.perplexity) / full.perplexity < 1e-5


def test_snapkv_serving_refuses_a_model_with_per_head_ranks(heads):
    with pytest.raises(ValueError, match="per-KV-head ranks"):
        paged_cache(layer_shapes(heads.config), CacheConfig(16, 32, kv_policy="snapkv", kv_budget=0.5),
                     torch.float32, model=heads.model)


@pytest.mark.parametrize("layer, message", [
    ({"mode": "rotate", "qk_rank": [32, 24, 16], "v_rank": 16}, r"qk_rank in \[1, 64\] \(one, or one per KV head\)"),
    ({"mode": "rotate", "qk_rank": [0, 32], "v_rank": 16}, r"qk_rank in \[1, 64\]"),
    ({"mode": "rotate", "qk_rank": 32, "v_rank": [16, 24, 8]}, "v_rank must be one rank or one per KV head"),
    ({"mode": "rotate", "qk_rank": 32, "v_rank": [16, 72]}, r"v_rank must be in \[1, 64\]"),
    ({"qk_pairs": [[0, 1], []], "v_rank": 16}, "every KV head must keep at least one RoPE pair"),
])
def test_bad_per_head_ranks_in_a_config_name_the_layer(bundled, layer, message):
    from zeroc.config import ModelConfig
    from zeroc.config import ConfigError

    raw = bundled.config.to_hf()
    raw["zeroc_compression"] = {"method": "zeroc-auto", "budget": 0.5, "fingerprint": "x",
                                "layers": [{"mode": "rotate", "qk_rank": 32, "v_rank": 32}] * 5 + [layer]}
    with pytest.raises(ConfigError, match=f"config.json: compression layer 5: .*{message}"):
        ModelConfig.from_hf(raw)


def test_per_head_ranks_are_written_as_lists_and_equal_ranks_collapse():
    from zeroc.config import LayerCompression

    layer = LayerCompression((), (16, 24), "rotate", (32, 32))
    assert layer.rotate_rank == 32 and layer.to_dict() == {"mode": "rotate", "qk_rank": 32, "v_rank": [16, 24]}
    assert LayerCompression.from_dict(layer.to_dict()) == layer and layer.per_head
    assert not LayerCompression((), (8, 8), "rotate", 32).per_head
    with pytest.raises(ValueError, match="per-KV-head ranks"):
        _ = LayerCompression(((0, 1), (0, 1, 2)), 8).qk_rank
