"""Calibration of a Llama-3-8B-shaped model on one GPU, measured on 8 layers and projected to 32 (≤ 5 minutes).

    python benchmarks/gpu_calibrate.py [--device cuda] [--dtype bfloat16] [--layers 8] [--json FILE]
    python benchmarks/gpu_calibrate.py --tiny          # the same run on a tiny shape on the CPU (a smoke test)

A random-init model of Llama-3-8B's shape (hidden 4096, 32 query / 8 KV heads of 128, SwiGLU 14336, vocabulary
128256; weights N(0, 0.02)) but `--layers` layers is built straight on the device and calibrated as
`zeroc calibrate --sensitivity local` does at budget 0.5 with per-KV-head ranks and the default token counts
(16384 calibration tokens, 2048 for the sensitivity). Timed phases: the reference pass, each layer (statistics,
factors, local costs of its 8 x 3 x 7 cuts), the full-model KL passes (two per layer), and the allocation + fold +
final KL (compress). Projection to 32 layers: the per-layer phases and the reference and compress passes scale with
the layer count; the KL passes scale with the square (twice as many passes, each through a longer model) unless
`--max-passes` caps them, so both projections are printed. Random weights time the work, not the quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from zeroc.bench.engine import LLAMA3_8B
from zeroc.compression.calibrate import ZeroCMethod, _windows, compress
from zeroc.compression.divergence import reference
from zeroc.compression.layerwise import measure_local
from zeroc.config import BUNDLED_CALIB, BUNDLED_MODEL, ModelConfig
from zeroc.data import read_eval_tokens
from zeroc.dtypes import parse_dtype
from zeroc.loader import LoadedModel
from zeroc.model import Transformer
from zeroc.tokenizer import Tokenizer

TINY = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, max_position_embeddings=2048, dtype="float32")
TINY_TOKENS = dict(calib_tokens=512, sensitivity_tokens=256, window=128, ablation_tokens=128)
TARGET_LAYERS = 32


def random_model(cfg: ModelConfig, device: str, dtype: torch.dtype, directory: Path) -> LoadedModel:
    """`cfg` with N(0, 0.02) weights on `device` (never on the host), as the loader would hand it over."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    model.init_rope()
    model.requires_grad_(False).eval()
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))  # what fingerprints and checkpoints name
    tokenizer.save(directory)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, path=directory)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    base = ModelConfig(**{**LLAMA3_8B.__dict__, **(TINY if args.tiny else {"vocab_size": 128256})})
    cfg = ModelConfig(**{**base.__dict__, "num_hidden_layers": args.layers})
    method = ZeroCMethod(budget=0.5, sensitivity="local", max_passes=args.max_passes,
                         **(TINY_TOKENS if args.tiny else {}))
    with tempfile.TemporaryDirectory() as tmp:
        loaded = random_model(cfg, args.device, parse_dtype(args.dtype), Path(tmp))
        marks: list[float] = []
        tokens = read_eval_tokens(loaded.tokenizer, BUNDLED_CALIB)
        sens = _windows(tokens, method.window, method.sensitivity_tokens).to(args.device)
        sync(args.device)
        start = time.perf_counter()
        reference(loaded.model, sens)  # timed alone: the pass measure_local runs before its first layer
        sync(args.device)
        ref_s = time.perf_counter() - start
        start = time.perf_counter()

        def on_layer(i: int) -> None:
            sync(args.device)
            marks.append(time.perf_counter())

        meas = measure_local(loaded, BUNDLED_CALIB, method, progress=not args.quiet, on_layer=on_layer)
        sync(args.device)
        measured = time.perf_counter()
        _, report = compress(loaded, meas, method)
        sync(args.device)
        done = time.perf_counter()
    per_layer = (marks[-1] - start - ref_s) / len(marks)
    phases = {"reference_s": ref_s, "per_layer_s": per_layer,
              "kl_passes_s": measured - marks[-1], "compress_s": done - measured}
    scale = TARGET_LAYERS / args.layers
    fixed = (phases["reference_s"] + phases["compress_s"]) * scale + per_layer * TARGET_LAYERS
    return {
        "shape": "tiny" if args.tiny else "llama3-8b", "layers": args.layers, "device": args.device,
        "dtype": args.dtype, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "method": str(method), "measured_total_s": done - start, **phases,
        "projected_32_layers_s": fixed + phases["kl_passes_s"] * scale ** 2,
        # with --max-passes 2 x the measured layers: as many KL passes as here, each through a longer model
        "projected_32_layers_capped_passes_s": fixed + phases["kl_passes_s"] * scale,
        "kv_fraction": report.kv_fraction, "measured_kl": report.measured_kl,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-passes", type=int, default=None, help="cap on the full-model KL passes")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU in float32 (smoke test)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    if args.tiny:
        args.device, args.dtype, args.layers = "cpu", "float32", min(args.layers, 2)
    torch.set_num_threads(1) if args.device == "cpu" else None
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    minutes = result["projected_32_layers_s"] / 60
    print(f"projected calibration of {TARGET_LAYERS} layers: {minutes:.1f} min "
          f"({result['projected_32_layers_capped_passes_s'] / 60:.1f} min with --max-passes {2 * args.layers})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
