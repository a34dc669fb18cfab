"""The streaming loader against transformers: random-init Llama, Mistral and Qwen2 checkpoints written by
transformers' own save_pretrained (several shards), every rope_scaling type, tied and untied embeddings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from zeroc.config import BUNDLED_MODEL
from zeroc.loader import load_model

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)

ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0},
}

CASES = [  # (family, rope, tied embeddings)
    ("llama", "default", False), ("llama", "linear", False), ("llama", "dynamic", True),
    ("llama", "llama3", False), ("llama", "yarn", False),
    ("mistral", "default", False), ("mistral", "yarn", True),
    ("qwen2", "default", True), ("qwen2", "linear", False),
]


def _hf_model(family: str, rope: str, tied: bool):
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    extra = {"sliding_window": None} if family == "mistral" else {}
    cfg = config_cls(**TINY, **extra, tie_word_embeddings=tied,
                     rope_parameters={"rope_theta": 10000.0, **ROPES[rope]})
    torch.manual_seed(7)
    model = model_cls._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random init with visible structure: biases and norms away from their defaults
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("family, rope, tied", CASES)
def test_logits_equal_transformers(tmp_path, family, rope, tied):
    hf = _hf_model(family, rope, tied)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shutil.copy(BUNDLED_MODEL / "tokenizer.json", tmp_path / "tokenizer.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2  # several shards
    if family == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in json.loads(
            (tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    loaded = load_model(tmp_path)
    assert loaded.config.tie_word_embeddings == tied
    tokens = torch.randint(0, TINY["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = loaded.model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_rope_types_change_the_logits(tmp_path):
    """The scaled types are not silently the default (dynamic is, within max_position_embeddings)."""
    tokens = torch.randint(0, TINY["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(3))
    out = {}
    for rope in ("default", "linear", "llama3", "yarn"):
        d = tmp_path / rope
        _hf_model("llama", rope, False).save_pretrained(d)
        shutil.copy(BUNDLED_MODEL / "tokenizer.json", d / "tokenizer.json")
        with torch.no_grad():
            out[rope] = load_model(d).model(tokens)
    for rope in ("linear", "llama3", "yarn"):
        assert (out[rope] - out["default"]).abs().max() > 1e-3, rope
