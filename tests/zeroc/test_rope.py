"""RoPE frequencies for every supported scaling type against transformers' rotary embedding."""

from __future__ import annotations

import pytest
import torch

from zeroc.config import ModelConfig, RopeConfig
from zeroc.rope import rope_inv_freq


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
