"""Decode steps of the bundled model on the CPU, attention by the references ("torch") against the ragged
kernel ("cpu"), side by side in one run. Run by hand, not in CI.

    .venv/bin/python benchmarks/ragged_cpu_engine.py --threads 1 2

For each batch (1/4/16 sequences holding `--context` tokens) a fresh Engine prefills random prompts
(untimed), then `--steps` decode steps are timed one by one; the backend's `paged_attention` calls are timed
inside them, which gives attention's share of a step. The mixed step: 15 sequences decoding, one new
256-token prompt admitted into the same step, timed alone. Backends alternate round by round so that load
from other processes hits both alike; each figure is the median over rounds of the per-round median.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from tqdm import tqdm

from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine, SamplingParams
from zeroc.loader import load_model
from zeroc_kernels.attention import select_backend


class AttentionClock:
    """Wraps a backend's paged_attention and sums the seconds spent in it."""

    def __init__(self, backend):
        self.seconds = 0.0
        inner = backend.paged_attention

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t
            return out

        backend.paged_attention = timed


def _engine(loaded, batch, context, vocab, rng):
    engine = Engine(loaded, CacheConfig(16, num_blocks=(batch + 2) * (-(-(context + 300) // 16))),
                    SchedulerConfig(max_num_seqs=batch + 1, enforce_eager=True))
    params = SamplingParams(max_new_tokens=10_000, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(vocab) for _ in range(context)], params)
    started = set()
    while len(started) < batch:  # prefill, untimed
        started.update(o.request_id for o in engine.step() if o.token_ids)
    return engine, params


def decode_round(loaded, clock, batch, context, steps, vocab, rng):
    """-> (median step ms, median attention ms per step)"""
    engine, _ = _engine(loaded, batch, context, vocab, rng)
    walls, attn = [], []
    for _ in range(steps):
        clock.seconds = 0.0
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
        attn.append(clock.seconds)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(attn)


def mixed_round(loaded, clock, context, vocab, rng):
    """One step holding 15 decodes at `context` and a new 256-token prompt -> (step ms, attention ms)"""
    engine, params = _engine(loaded, 15, context, vocab, rng)
    engine.step()
    engine.add_request([rng.randrange(vocab) for _ in range(256)], params)
    clock.seconds = 0.0
    t = time.perf_counter()
    engine.step()
    return 1e3 * (time.perf_counter() - t), 1e3 * clock.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    loaded = load_model(BUNDLED_MODEL)
    vocab = loaded.config.vocab_size
    backends = {name: select_backend(name, "cpu") for name in ("torch", "cpu")}
    clocks = {name: AttentionClock(b) for name, b in backends.items()}
    rng = random.Random(0)
    load_before = os.getloadavg()[0]
    print(f"# load avg {load_before:.2f} at start; context {args.context}; ms (median over {args.rounds} rounds)")
    print("| step | threads | torch step | torch attention | cpu step | cpu attention | step speed-up |")
    print("|---|---|---|---|---|---|---|")
    cases = [(f"decode b={b}", b) for b in args.batches] + [("mixed: 256-token prompt + 15 decodes", None)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, batch in tqdm(cases, desc=f"{threads} thread(s)", leave=False):
            res = {name: [] for name in backends}
            for _ in range(args.rounds):
                for name, backend in backends.items():
                    loaded.model.backend = backend
                    res[name].append(decode_round(loaded, clocks[name], batch, args.context, args.steps, vocab, rng)
                                     if batch else mixed_round(loaded, clocks[name], args.context, vocab, rng))
            med = {n: [statistics.median(x[i] for x in r) for i in (0, 1)] for n, r in res.items()}
            (ts, ta), (cs, ca) = med["torch"], med["cpu"]
            print(f"| {label} | {threads} | {ts:.2f} | {ta:.2f} ({ta / ts:.0%}) | {cs:.2f} | {ca:.2f} ({ca / cs:.0%}) "
                  f"| {ts / cs:.2f}x |", flush=True)
    print(f"# load avg {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
