"""The cpu backend's GEMMs (`CpuBackend.linear`: oneDNN on packed weights) against oneDNN on the weight as it lies
(unpacked; F.linear for small weights) and F.linear alone (MKL's sgemm in torch's CPU wheels), side by side in one
run: each GEMM shape of the bundled model and of Llama-3-8B (the fused ones too), then the bundled model's decode
steps and a prefill forward with the engine's model switched between the three, alternating rounds (the cpu backend
with its Q/K/V and gate/up fused, the other two unfused, as the cpu backend ran before it packed). `--dtype
bfloat16` runs all of it in bf16 (packed where oneDNN has bf16 kernels for the CPU: `PACKED_DTYPES`); `--shape
llama3-8b` runs the engine rows on `--layers` decoder layers of Llama-3-8B's shape with random weights (and the
bench's 8,192-token vocabulary, zeroc/bench/engine.py), whose weights, unlike the bundled model's, do not fit the
CPU's caches. Last, the resident memory that readying that model to serve adds, with the plain weights released
(what an Engine does: each weight held once, as its pack) and kept, each measured in a fresh process.
`--gemms-only` stops after the GEMM rows.

    .venv/bin/python benchmarks/cpu_linear.py [--threads 2] [--rounds 3] [--batches 1 16 64] [--dtype float32]
                                              [--shape bundled] [--layers 2] [--prefill 1024] [--calls 30]
                                              [--steps 30] [--gemms-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_projections import decode_ms, prefill_ms, random_loaded  # noqa: E402  (the same steps and models)

from zeroc.config import BUNDLED_MODEL  # noqa: E402
from zeroc.loader import LoadedModel, load_model  # noqa: E402
from zeroc.layers import Linear  # noqa: E402
from zeroc_kernels.attention import CpuBackend  # noqa: E402
from zeroc_kernels.cpu_linear import PACKED_DTYPES, WeightPack  # noqa: E402

# (name, in, out): the bundled model's projections (and the cpu backend's fused ones) and LM head, and Llama-3-8B's
# q/o projection and MLP
SHAPES = [("bundled q/o", 384, 384), ("bundled k/v", 384, 128), ("bundled qkv fused", 384, 640),
          ("bundled gate/up", 384, 1024), ("bundled gate_up fused", 384, 2048), ("bundled down", 1024, 384),
          ("bundled lm_head", 384, 8192), ("llama3-8b q/o", 4096, 4096), ("llama3-8b qkv fused", 4096, 6144),
          ("llama3-8b gate/up", 4096, 14336), ("llama3-8b gate_up fused", 4096, 28672), ("llama3-8b down", 14336, 4096)]


class MklCpuBackend(CpuBackend):
    """The cpu backend with F.linear for every GEMM, unfused: what it ran before its GEMMs went through oneDNN."""

    name = "cpu-mkl"
    fuses_projections = False

    def linear(self, x, weight, bias=None, pack=None):
        return F.linear(x, weight, bias)

    def prepack(self, weight, pack):
        pass  # it runs no pack, so it makes none (a served model drops the plain weights of what was packed)


class UnpackedCpuBackend(CpuBackend):
    """The cpu backend with `pack_weights` off (oneDNN on the weights as they lie) and unfused: what it ran before it
    packed."""

    name = "cpu-unpacked"
    fuses_projections = False

    def __init__(self):
        super().__init__(pack_weights=False)


def gemm_ms(fn, x: torch.Tensor, w: torch.Tensor, calls: int) -> float:
    for _ in range(min(3, calls)):
        fn(x, w)
    t = time.perf_counter()
    for _ in range(calls):
        fn(x, w)
    return (time.perf_counter() - t) / calls * 1e3


@torch.no_grad()  # not inference_mode: an inference tensor has no version counter, and is never packed
def gemm_rows(batches: list[int], backend: CpuBackend, dtype: torch.dtype, calls: int = 30) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        w = torch.randn(n, k, generator=gen).to(dtype)
        pack = WeightPack()
        for m in batches:
            x = torch.randn(m, k, generator=gen).to(dtype)
            mkl, plain = gemm_ms(F.linear, x, w, calls), gemm_ms(backend.linear, x, w, calls)
            ours = gemm_ms(lambda x, w: backend.linear(x, w, None, pack), x, w, calls)
            rows.append({"gemm": name, "m": m, "k": k, "n": n, "f_linear_ms": mkl, "unpacked_ms": plain,
                         "backend_ms": ours})
            print(f"gemm {name:<21} {m:>3}x{k}x{n:<5} F.linear {mkl:7.3f} ms   unpacked {plain:7.3f} ms   "
                  f"cpu backend {ours:7.3f} ms   {ours / mkl:5.2f}x", flush=True)
    return rows


def engine_rows(loaded: LoadedModel, batches: list[int], rounds: int, prefill: int, steps: int = 30) -> list[dict]:
    sides = {"cpu backend": loaded.model.backend, "unpacked": UnpackedCpuBackend(), "F.linear": MklCpuBackend()}
    times = {side: {b: [] for b in [*batches, "prefill"]} for side in sides}
    for r in range(rounds + 1):  # the first round warms up, untimed
        for side, backend in sides.items():
            loaded.model.backend = backend  # hands its `linear` to every Linear of the model
            if not backend.fuses_projections:  # the parts run alone (an Engine fuses again on the cpu backend)
                for layer in loaded.model.model.layers:
                    layer.self_attn.qkv = layer.mlp.gate_up = None
            got = {b: decode_ms(loaded, b, steps) for b in batches} | {"prefill": prefill_ms(loaded.model, prefill)}
            for key, ms in got.items():
                if r:
                    times[side][key].append(ms)
    rows = []
    for key in [*batches, "prefill"]:
        ours, plain, mkl = (statistics.median(times[side][key]) for side in sides)
        what = f"decode b{key}" if key != "prefill" else f"prefill {prefill}"
        rows.append({"what": what, "backend_ms": ours, "unpacked_ms": plain, "f_linear_ms": mkl})
        print(f"engine {what:<14} cpu backend {ours:7.2f} ms   unpacked {plain:7.2f} ms   F.linear {mkl:7.2f} ms   "
              f"{ours / mkl:5.2f}x", flush=True)
    return rows


def engine_model(shape: str, layers: int, dtype: torch.dtype) -> LoadedModel:
    """The bundled model, or `layers` layers of Llama-3-8B's shape with random weights, in `dtype` on the cpu
    backend."""
    if shape == "bundled":
        return load_model(BUNDLED_MODEL, dtype, attention_backend="cpu")
    loaded = random_loaded(shape, layers, dtype)
    loaded.model.backend = CpuBackend()
    return loaded


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_row(shape: str, layers: int, dtype: str) -> dict:
    """Resident memory that readying the model to serve adds (`Transformer.prepare_to_serve`: fused and packed GEMMs)
    with its plain weights released, as an Engine does, and kept, each in a fresh process."""
    row = {}
    for side in ("released", "kept"):
        r = subprocess.run([sys.executable, __file__, "--memory-side", side, "--shape", shape, "--layers", str(layers),
                            "--dtype", dtype], capture_output=True, text=True, check=True)
        added, packed = r.stdout.split()[-2:]
        row[f"{side}_gib"], row["packed_gib"] = int(added) / 2**30, int(packed) / 2**30
    print(f"serving adds {row['released_gib']:.3f} GiB with the plain weights released, "
          f"{row['kept_gib']:.3f} GiB with them kept ({row['packed_gib']:.3f} GiB packed)", flush=True)
    return row


def _memory_side(loaded: LoadedModel, side: str) -> None:
    gc.collect()
    before = resident_bytes()
    model = loaded.model
    model.prepare_to_serve(release=side == "released")
    gc.collect()
    packs = [m.pack.packed for m in model.modules() if isinstance(m, Linear)] + [f.pack.packed for f in model._fused()]
    print(resident_bytes() - before, sum(p.numel() * p.element_size() for p in packs if p is not None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="bundled", choices=["bundled", "llama3-8b"], help="the engine rows' model")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the llama3-8b shape")
    p.add_argument("--prefill", type=int, default=1024, help="tokens of the prefill row (two prompts)")
    p.add_argument("--calls", type=int, default=30, help="calls per GEMM timing")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per engine row")
    p.add_argument("--gemms-only", action="store_true", help="the GEMM rows alone (no engine or memory rows)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--memory-side", choices=["released", "kept"], help=argparse.SUPPRESS)  # memory_row's child
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    loaded = engine_model(args.shape, args.layers, dtype)
    if args.memory_side:
        return _memory_side(loaded, args.memory_side)
    result = {"threads": args.threads, "dtype": args.dtype, "packed": dtype in PACKED_DTYPES, "shape": args.shape,
              "layers": loaded.config.num_hidden_layers,
              "gemms": gemm_rows(args.batches, loaded.model.backend, dtype, args.calls)}
    if not args.gemms_only:
        result["engine"] = engine_rows(loaded, args.batches, args.rounds, args.prefill, args.steps)
        result["memory"] = memory_row(args.shape, args.layers, args.dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
