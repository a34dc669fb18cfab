"""Calibration wall time and peak memory against model size, for random-init Llama-shaped models.

    python benchmarks/calibrate_scaling.py [--sizes tiny 100m 400m] [--calib-tokens 2048]
                                           [--sensitivity-tokens 512] [--window 256] [--device cpu] [--json]

Per size: a random-init model (the bundled tokenizer, weights N(0, 0.02)) is written as a sharded checkpoint,
then a fresh process loads it (the streaming loader) and calibrates it at budget 0.5 with per-KV-head ranks and
the layer-local sensitivity (zeroc/compression/layerwise.py); it reports the load and calibration wall times and
its peak RSS (getrusage). Random weights time the work, not the quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from zeroc.config import BUNDLED_MODEL, ModelConfig
from zeroc.model import Transformer
from zeroc.tokenizer import Tokenizer

# Llama-shaped: GQA, SwiGLU; the bundled tokenizer's vocabulary
SHAPES = {
    "tiny": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=64),  # the bundled model's shape
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64),
    "400m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=64),
}

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from zeroc.compression.calibrate import ZeroCMethod
from zeroc.compression.layerwise import calibrate_model
from zeroc.config import BUNDLED_CALIB
from zeroc.loader import load_model
t0 = time.perf_counter()
loaded = load_model(sys.argv[1], device=sys.argv[4])
t1 = time.perf_counter()
method = ZeroCMethod(budget=0.5, sensitivity="local", **json.loads(sys.argv[2]))
_, report = calibrate_model(loaded, BUNDLED_CALIB, method, progress=False)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "calibrate_s": t2 - t1, "peak_rss": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss * 1024, "kv_fraction": report.kv_fraction}))
"""


def random_checkpoint(shape: dict, out: Path, shard_layers: int = 4) -> int:
    """Write a random-init model of `shape` to `out` -> its parameter count."""
    from safetensors.torch import save_file

    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **shape)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    names = list(model.state_dict())
    shards: dict[str, list[str]] = {}
    for name in names:  # a shard per `shard_layers` layers, embeddings and head with the first and last
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else 10**9)
        shards.setdefault(f"{max(0, min(layer, cfg.num_hidden_layers - 1)) // shard_layers}", []).append(name)
    weight_map, total = {}, 0
    for n, keys in enumerate(shards.values()):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.ones if "norm" in k else torch.randn)(model.state_dict()[k].shape) * (
            1.0 if "norm" in k else 0.02) for k in keys}
        total += sum(t.numel() for t in tensors.values())
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    tokenizer.save(out)
    return total


def run_size(name: str, method: dict, threads: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        params = random_checkpoint(SHAPES[name], Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, json.dumps(method), str(threads), device],
                             capture_output=True, text=True, env=env, check=True)
        shards = max(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    return {"size": name, "parameters": params, "largest_shard": shards, **json.loads(out.stdout.splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=["tiny", "100m"])
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--sensitivity-tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    method = {"calib_tokens": args.calib_tokens, "sensitivity_tokens": args.sensitivity_tokens,
              "window": args.window, "ablation_tokens": min(1024, args.calib_tokens)}
    rows = [run_size(name, method, args.threads, args.device) for name in args.sizes]
    if args.json:
        print(json.dumps({"method": method, "rows": rows}))
        return
    print(f"calibration: {method}, budget 0.5, per-head ranks, local sensitivity, {args.threads} thread(s)")
    print("| model | parameters | largest shard MB | load s | calibrate s | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['parameters'] / 1e6:.1f}M | {r['largest_shard'] / 2**20:.0f} | {r['load_s']:.1f} | "
              f"{r['calibrate_s']:.0f} | {r['peak_rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
