"""RoPE frequencies for every supported scaling type against transformers' rotary embedding."""

from __future__ import annotations

import pytest
import torch

from zeroc.attend import DenseCausal
from zeroc.config import ModelConfig, RopeConfig
from zeroc.loader import load_model
from zeroc.rope import RopeTables, rope_inv_freq, rope_qk


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=10000.0),
    RopeConfig(theta=500000.0, rope_type="linear", factor=4.0),
    RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192),
    RopeConfig(theta=10000.0, rope_type="llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
               original_max_position_embeddings=512),
])
def test_inv_freq_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = ModelConfig(vocab_size=32, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=128, rope=rope)
    hf = LlamaRotaryEmbedding(LlamaConfig(**cfg.to_hf()))
    assert hf.attention_scaling == 1.0
    torch.testing.assert_close(rope_inv_freq(rope, 128), hf.inv_freq.float(), rtol=1e-6, atol=0)


def test_hf_config_round_trip_keeps_rope_scaling():
    rope = RopeConfig(theta=5e5, rope_type="llama3", factor=8.0, original_max_position_embeddings=4096)
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope=rope)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    # transformers >= 5 writes rope_parameters instead of rope_theta / rope_scaling
    modern = {k: v for k, v in cfg.to_hf().items() if k not in ("rope_theta", "rope_scaling")}
    modern["rope_parameters"] = {"rope_theta": 5e5, **rope.to_hf()}
    assert ModelConfig.from_hf(modern) == cfg


class PerLayerRope(RopeTables):
    """The oracle: every layer computes its own cos/sin from its own frequencies (no sharing)."""

    def qk(self, key, q, k, inv_freq):
        self.computed += 1
        return rope_qk(q, k, inv_freq, self.positions)


def _logits(model, tokens, rope_cls):
    # tokens: [1, T] -> logits [1, T, vocab] of a dense causal forward with the given RoPE tables, and the norms of
    # the model's backend (the cpu backend's C++ ones differ from the references in a sum's order)
    rope = rope_cls(torch.arange(tokens.shape[1]).expand_as(tokens))
    x = model.model.embed_tokens(tokens)
    for layer in model.model.layers:
        x = layer(x, rope, DenseCausal(), model.backend)
    return model.lm_head(model.model.norm(x, model.backend)), rope.computed


@pytest.mark.parametrize("name", ["bundled", "zeroc_heads_dir", "zeroc_tier_dir", "zeroc_modes_dir"])
def test_rope_tables_are_computed_once_per_forward_and_change_nothing(name, request):
    """An uncompressed model's six layers share one cos/sin table; compressed layers that keep other RoPE
    pairs get their own. The logits equal, bit for bit, those of every layer computing its own, and the
    forward the model runs is this one."""
    loaded = request.getfixturevalue(name)
    model = loaded.model if name == "bundled" else load_model(loaded).model
    tokens = torch.randint(4, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        shared, tables = _logits(model, tokens, RopeTables)
        oracle, per_layer = _logits(model, tokens, PerLayerRope)
        assert torch.equal(shared, oracle)
        assert torch.equal(model(tokens), shared)
    if name == "bundled":
        assert tables == 1 and per_layer == model.config.num_hidden_layers
    elif name == "zeroc_modes_dir":  # its rotate layers run RoPE on every pair: one table for all three
        assert tables < per_layer
    else:
        assert 1 <= tables <= per_layer


def test_a_backend_with_a_rope_kernel_gets_every_q_and_k_and_no_tables_are_built(zeroc_tier_dir):
    """On triton (`fused_rope`) the layers the epilogues do not serve (per-KV-head ranks, a token tier's dims,
    the dense forward) run RoPE as one kernel per tensor: no cos/sin tables, the tables' logits within
    rounding, and each q and k of every layer through the backend."""
    from zeroc_kernels.attention import TritonBackend

    class Counting(TritonBackend):
        calls = 0

        def rope(self, x, positions, inv_freq):
            Counting.calls += 1
            return super().rope(x, positions, inv_freq)

    model = load_model(zeroc_tier_dir).model
    tokens = torch.randint(4, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, _ = _logits(model, tokens, RopeTables)
        got, tables = _logits(model, tokens, lambda positions: RopeTables(positions, Counting()))
    # every layer's q and k (per run in per-head layers), and a fold layer's tier dims besides
    assert tables == 0 and Counting.calls > 2 * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
