"""The cpu backend's norms and RoPE in C++ (kernels/cpu_layer_ops.py) against the same backend on the eager
references, on the bundled model: decode steps at a few batch sizes (128-token prompts; the two sides take turns
within one Engine) and a 1,024-token prefill forward (alternating rounds), in fp32 and bf16. The figures in
docs/benchmarks.md ("Norms and RoPE in C++") come from it.

    .venv/bin/python benchmarks/cpu_layer_ops.py [--threads 2] [--rounds 8] [--batches 1 4 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from fused_projections import prefill_ms, prefilled_engine
from tqdm import tqdm

from zeroc.bench.forward import machine_description
from zeroc.config import BUNDLED_MODEL
from zeroc.loader import load_model
from zeroc_kernels.attention import AttentionBackend

OPS = ("rms_norm", "add_rms_norm", "apply_rope")


def eager_ops(backend: AttentionBackend) -> AttentionBackend:
    """A copy of `backend` whose norms and RoPE are the eager references (its GEMMs and attention unchanged)."""
    other = copy.copy(backend)
    for name in OPS:
        setattr(other, name, getattr(AttentionBackend, name).__get__(other))
    return other


def decode_steps(loaded, backends: dict, batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median decode step of `batch` requests of 128 random tokens on each side, the sides taking turns every
    `steps` steps in one Engine (after one untimed step each turn), so that drift in the machine hits both alike."""
    engine = prefilled_engine(loaded, batch, (rounds + 1) * len(backends) * (steps + 1) + 2)
    times: dict[str, list[float]] = {side: [] for side in backends}
    for r in range(rounds + 1):  # the first round warms up, untimed
        for side, backend in backends.items():
            loaded.model.backend = backend
            engine.step()
            for _ in range(steps):
                t = time.perf_counter()
                engine.step()
                if r:
                    times[side].append(time.perf_counter() - t)
    return {side: statistics.median(ts) * 1e3 for side, ts in times.items()}


def measure(dtype: str, batches: list[int], rounds: int, steps: int) -> dict:
    """Each case's median on both sides, measured side by side."""
    loaded = load_model(BUNDLED_MODEL, dtype=dtype, attention_backend="cpu")
    backends = {"c++": loaded.model.backend, "eager": eager_ops(loaded.model.backend)}
    out = {f"decode b{b}": decode_steps(loaded, backends, b, rounds, steps)
           for b in tqdm(batches, desc=f"{dtype} decode")}
    prefill: dict[str, list[float]] = {side: [] for side in backends}
    for r in tqdm(range(rounds + 1), desc=f"{dtype} prefill"):
        for side, backend in backends.items():
            loaded.model.backend = backend
            ms = prefill_ms(loaded.model)
            if r:
                prefill[side].append(ms)
    out["prefill 1024"] = {side: statistics.median(ts) for side, ts in prefill.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {dtype: measure(dtype, args.batches, args.rounds, args.steps) for dtype in args.dtypes}
    machine = machine_description()
    print(f"{machine}, medians of {args.rounds} rounds, ms")
    print(f"{'dtype':<9} {'case':<13} {'eager':>8} {'c++':>8} {'c++/eager':>10}")
    for dtype, cases in results.items():
        for case, ms in cases.items():
            print(f"{dtype:<9} {case:<13} {ms['eager']:8.2f} {ms['c++']:8.2f} {ms['c++'] / ms['eager']:10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
