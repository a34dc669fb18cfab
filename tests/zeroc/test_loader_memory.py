"""Peak host memory of the streaming loader: about one shard on top of the model it builds, never a second
copy of the checkpoint. Measured in a fresh process (its own peak RSS) on a ~250 MB model stored in bf16 in
4 shards and loaded as fp32, where reading the whole checkpoint first would hold both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import save_file

from zeroc.config import BUNDLED_MODEL, ModelConfig

CFG = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
SLACK = 32 << 20  # allocator and interpreter noise, independent of the model's size

PROBE = """
import json, sys, torch
torch.set_num_threads(1)
from zeroc.loader import load_model, read_config
from zeroc.model import Transformer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

# the first module built on the meta device costs ~70 MB of lazily initialised code, whatever the model's size
with torch.device("meta"):
    Transformer(read_config(sys.argv[1]))
before = rss()
loaded = load_model(sys.argv[1], dtype="float32")
after = rss()
with open("/proc/self/status") as f:  # VmHWM: this process's peak RSS since its exec. (ru_maxrss would not do:
    # Linux keeps it across exec, so a child forked from a large pytest process inherits the parent's peak.)
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(json.dumps({"before": before, "after": after, "peak": peak, "model": size}))
"""


def _layer_tensors(i: int) -> dict[str, torch.Tensor]:
    h, f, kv = CFG.hidden_size, CFG.intermediate_size, CFG.num_key_value_heads * CFG.head_dim
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
              "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
              "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    return {f"model.layers.{i}.{k}": torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}


def _write_checkpoint(d) -> int:
    """4 bf16 shards (embeddings; layers 0-1; layers 2-3; head) -> the largest shard's bytes."""
    h, v = CFG.hidden_size, CFG.vocab_size
    shards = [lambda: {"model.embed_tokens.weight": torch.randn(v, h, dtype=torch.bfloat16),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
              lambda: {**_layer_tensors(0), **_layer_tensors(1)},
              lambda: {**_layer_tensors(2), **_layer_tensors(3)},
              lambda: {"lm_head.weight": torch.randn(v, h, dtype=torch.bfloat16)}]
    weight_map = {}
    for n, make in enumerate(shards):
        name = f"model-{n + 1:05d}-of-00004.safetensors"
        tensors = make()  # one shard at a time in this process too
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({**CFG.to_hf(), "torch_dtype": "bfloat16"}))
    shutil.copy(BUNDLED_MODEL / "tokenizer.json", d / "tokenizer.json")
    return max(f.stat().st_size for f in d.glob("*.safetensors"))


def test_peak_rss_is_one_shard_above_the_model(tmp_path):
    largest = _write_checkpoint(tmp_path)
    # every large allocation its own mapping, so freed memory leaves RSS at once and "after" is what is held
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["model"] > 200 << 20  # fp32: twice the checkpoint
    transient = m["peak"] - m["after"]  # what loading held beyond the loaded model
    assert transient <= 1.2 * largest + SLACK, (m, largest)
    assert m["peak"] - m["before"] <= m["model"] + 1.2 * largest + SLACK, (m, largest)
