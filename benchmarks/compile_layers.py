"""Engine steps of the bundled model with each layer's norm + MLP compiled (`SchedulerConfig.compile_layers`)
against eager, side by side in one run. Run by hand, not in CI.

    .venv/bin/python benchmarks/compile_layers.py [--threads 2] [--rounds 3]

For each case a fresh Engine on each side prefills its prompts (untimed), then `--steps` decode steps are
timed one by one; the prompt case times one step that computes a whole 256-token prompt. The two sides
alternate round by round; each figure is the median over rounds of the per-round median step, in ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from tqdm import tqdm

from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine, SamplingParams
from zeroc.loader import load_model


def decode_ms(loaded, compiled: bool, batch: int, steps: int, rng: random.Random) -> float:
    engine = Engine(loaded, CacheConfig(16, num_blocks=(batch + 1) * 40),
                    SchedulerConfig(max_num_seqs=batch + 1, compile_layers=compiled, async_scheduling=False))
    for _ in range(batch):
        engine.add_request([rng.randrange(4, 8192) for _ in range(256)],
                           SamplingParams(max_new_tokens=10_000, ignore_eos=True))
    while engine.last_step_tokens != batch:  # prefill, untimed
        engine.step()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    return 1e3 * statistics.median(walls)


def prompt_ms(loaded, compiled: bool, rng: random.Random) -> float:
    engine = Engine(loaded, CacheConfig(16, num_blocks=64), SchedulerConfig(compile_layers=compiled,
                                                                            async_scheduling=False))
    engine.add_request([rng.randrange(4, 8192) for _ in range(256)], SamplingParams(max_new_tokens=1))
    t = time.perf_counter()
    engine.step()
    return 1e3 * (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {False: load_model(BUNDLED_MODEL), True: load_model(BUNDLED_MODEL)}  # compiling changes a model
    rng = random.Random(0)
    t = time.perf_counter()
    prompt_ms(models[True], True, rng)  # compile (dynamic shapes: once for every token count)
    decode_ms(models[True], True, 2, 2, rng)
    print(f"# first compile and warm-up: {time.perf_counter() - t:.1f} s; {args.threads} thread(s)")
    print("| step | eager ms | compiled ms | compiled / eager |\n|---|---|---|---|")
    cases = [(f"decode b={b}", b) for b in (1, 4, 16)] + [("a 256-token prompt", None)]
    for label, batch in tqdm(cases, leave=False):
        res = {False: [], True: []}
        for _ in range(args.rounds):
            for compiled, loaded in models.items():
                res[compiled].append(decode_ms(loaded, compiled, batch, args.steps, rng) if batch
                                     else prompt_ms(loaded, compiled, rng))
        e, c = statistics.median(res[False]), statistics.median(res[True])
        print(f"| {label} | {e:.2f} | {c:.2f} | {c / e:.2f} |", flush=True)


if __name__ == "__main__":
    main()
