"""`zeroc bench forward`: prefill and decode throughput of a model through the paged cache."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass

import torch

from zeroc.config import CacheConfig
from zeroc.caches import paged_cache, sequence_blocks
from zeroc.kv_cache import PagedKVCache, layer_shapes
from zeroc.loader import LoadedModel


@dataclass(frozen=True)
class ForwardBench:
    name: str  # "prefill" | "decode"
    tokens: int  # prompt length (prefill) or batch size (decode)
    context: int
    tokens_per_s: float
    ms_per_step: float


def _cache(loaded: LoadedModel, tokens: int, seqs: int, block_size: int = 16) -> PagedKVCache:
    cfg = loaded.config
    shapes = layer_shapes(cfg)
    blocks = seqs * sequence_blocks(cfg, block_size, tokens)
    param = next(loaded.model.parameters())
    return paged_cache(shapes, CacheConfig(block_size, blocks), param.dtype, param.device, model=loaded.model)


@torch.inference_mode()
def bench_prefill(loaded: LoadedModel, length: int, repeats: int = 3) -> ForwardBench:
    """Best of `repeats` single-sequence prefills of `length` tokens."""
    tokens = torch.randint(0, loaded.config.vocab_size, (length,))
    best = float("inf")
    for r in range(repeats + 1):  # the first run warms up allocators and is not counted
        cache = _cache(loaded, length, 1)
        batch = cache.schedule([("s", length)])
        start = time.perf_counter()
        loaded.model.forward_paged(tokens, batch.positions, batch, cache, batch.last_token_indices)
        if r:
            best = min(best, time.perf_counter() - start)
    return ForwardBench("prefill", length, length, length / best, best * 1e3)


@torch.inference_mode()
def bench_decode(loaded: LoadedModel, batch_size: int, context: int = 256, steps: int = 32) -> ForwardBench:
    """Decode `steps` tokens for `batch_size` sequences that each hold `context` tokens."""
    cache = _cache(loaded, context + steps + 1, batch_size)
    seqs = [f"s{i}" for i in range(batch_size)]
    prompt = torch.randint(0, loaded.config.vocab_size, (batch_size * context,))
    batch = cache.schedule([(s, context) for s in seqs])
    loaded.model.forward_paged(prompt, batch.positions, batch, cache, batch.last_token_indices)
    step_tokens = torch.randint(0, loaded.config.vocab_size, (batch_size,))
    start = time.perf_counter()
    for _ in range(steps):
        batch = cache.schedule([(s, 1) for s in seqs])
        loaded.model.forward_paged(step_tokens, batch.positions, batch, cache)
    elapsed = time.perf_counter() - start
    return ForwardBench("decode", batch_size, context, batch_size * steps / elapsed, elapsed / steps * 1e3)


@torch.inference_mode()
def engine_decode_step_s(loaded: LoadedModel, cache: CacheConfig, prompts: list[list[int]], steps: int) -> float:
    """Mean seconds per decode step of one engine (KV policy, token tier: whatever `cache` and the model
    bring) running `prompts` after their prefill step. The step's token budget holds every prompt, so no
    timed step computes a chunk of one (the default budget of 4,096 tokens would, past 4 x 1,024)."""
    from zeroc.config import SchedulerConfig
    from zeroc.engine import Engine
    from zeroc.sampling import SamplingParams

    total = sum(map(len, prompts))
    engine = Engine(loaded, cache, SchedulerConfig(max_num_seqs=max(64, len(prompts)),
                                                   max_num_batched_tokens=max(4096, total),
                                                   async_scheduling=False))  # each step waits for its ids
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
    engine.step()  # prefill
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps


def machine_description() -> str:
    """CPU model and thread count, e.g. 'AMD EPYC, 2 threads' (for benchmark records)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def run_forward_bench(loaded: LoadedModel, prefill_lengths=(512, 2048), decode_batches=(1, 16)) -> dict:
    rows = [bench_prefill(loaded, n) for n in prefill_lengths if n <= loaded.config.max_position_embeddings]
    rows += [bench_decode(loaded, b) for b in decode_batches]
    return {
        "model": str(loaded.path),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "machine": machine_description(),
        "results": [asdict(r) for r in rows],
    }
