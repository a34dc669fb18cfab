"""Q/K/V and gate/up as one GEMM each (`Transformer.fuse_projections`) against the separate GEMMs, on the
bundled model's shape with random weights: a batch's decode step and a prefill forward, alternating rounds, on the
backend the model loads with (the cpu backend where it builds: packed oneDNN GEMMs). Why the cpu backend fuses and
the torch backend keeps the separate GEMMs (docs/engine.md, "Fewer kernels per layer").

    .venv/bin/python benchmarks/fused_projections.py [--threads 2] [--rounds 4] [--batch 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from zeroc.bench.engine import EngineBenchSpec, base_config, method_config, random_model
from zeroc.caches import paged_cache
from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.kv_cache import layer_shapes
from zeroc.loader import LoadedModel
from zeroc.sampling import SamplingParams
from zeroc.tokenizer import Tokenizer


def _separate(backend):
    """The model's backend, as a copy whose Engine does not fuse the projections again."""
    other = copy.copy(backend)
    other.fuses_projections = False
    return other


def _fused(model, on: bool, saved: list, backends: dict) -> None:
    """Switch the model between its fused GEMMs (saved once) and the separate ones."""
    model.backend = backends[on]
    for layer, (qkv, gate_up) in zip(model.model.layers, saved):
        layer.self_attn.qkv, layer.mlp.gate_up = (qkv, gate_up) if on else (None, None)


def random_loaded(shape: str = "bundled", layers: int | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """`layers` decoder layers (None: the shape's) of a bench shape (zeroc/bench/engine.py) with random weights, on the
    CPU backend `auto` picks."""
    cfg = method_config(base_config(EngineBenchSpec(shape=shape, layers=layers)), "none")
    return LoadedModel(random_model(cfg, torch.device("cpu"), dtype, 0), cfg, Tokenizer.from_dir(BUNDLED_MODEL),
                       BUNDLED_MODEL)


def prefilled_engine(loaded: LoadedModel, batch: int, new_tokens: int) -> Engine:
    """An Engine (each step synchronous, so that it can be timed whole) holding `batch` requests of 128 random
    tokens, each to run `new_tokens` more, with their prompts already computed."""
    blocks_per_seq = -(-(128 + new_tokens) // 16)
    engine = Engine(loaded, CacheConfig(16, batch * blocks_per_seq + 1),
                    SchedulerConfig(max_num_seqs=batch, async_scheduling=False))
    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        engine.add_request(torch.randint(2, 500, (128,), generator=gen).tolist(),
                           SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    while engine.waiting or any(s.in_cache < 128 for s in engine.running):
        engine.step()
    return engine


def decode_ms(loaded: LoadedModel, batch: int, steps: int = 30) -> float:
    """Median decode step of `batch` requests of 128 random tokens."""
    engine = prefilled_engine(loaded, batch, steps + 8)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def prefill_ms(model, tokens: int = 1024) -> float:
    """One forward of two prompts of tokens / 2 each through a fresh paged cache."""
    dtype = next(model.parameters()).dtype
    cache = paged_cache(layer_shapes(model.config), CacheConfig(16, tokens // 16 + 4), dtype, model=model)
    batch = cache.schedule([("a", tokens // 2), ("b", tokens // 2)])
    ids = torch.randint(2, 500, (tokens,), generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    model.forward_paged(ids, batch.positions, batch, cache)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = random_loaded()
    loaded.model.fuse_projections()
    saved = [(layer.self_attn.qkv, layer.mlp.gate_up) for layer in loaded.model.model.layers]
    backends = {True: loaded.model.backend, False: _separate(loaded.model.backend)}
    rows = {False: [], True: []}
    for r in range(args.rounds + 1):  # the first round warms up, untimed
        for on in (False, True):
            _fused(loaded.model, on, saved, backends)
            times = (decode_ms(loaded, args.batch), prefill_ms(loaded.model))
            if r:
                rows[on].append(times)
    for on in (False, True):
        dec, pre = (statistics.median(t[i] for t in rows[on]) for i in (0, 1))
        print(f"{'fused' if on else 'separate':<9} decode b{args.batch} {dec:7.2f} ms   prefill 1024 {pre:7.2f} ms   "
              f"({loaded.model.backend.name} backend)")


if __name__ == "__main__":
    main()
