"""A prompt's prefill (no cached prefix) with the backend's fresh path (torch's SDPA over the prompt's own rows)
against the same backend's paged kernel, side by side in one run. Run by hand, not in CI.

    .venv/bin/python benchmarks/fresh_prefill.py --threads 2                 # the bundled model, cpu backend
    python benchmarks/fresh_prefill.py --device cuda --backend triton        # on a GPU, the Triton backend

Each round times one prefill step of a fresh Engine per prompt length, once with the fresh path and once
with it off (the backend's `fresh_prefill_min_tokens` set past the prompt), alternating which goes first.
Reports the median step over rounds and the ratio fresh / paged per length; the whole step is timed
(attention plus the rest of the forward), which is what a prompt's time to first token pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from zeroc.config import BUNDLED_MODEL, CacheConfig, SchedulerConfig
from zeroc.engine import Engine, SamplingParams
from zeroc.loader import load_model


def prefill_s(loaded, tokens: list[int], fresh: bool) -> float:
    backend = loaded.model.backend
    backend.fresh_prefill_min_tokens = 1 if fresh else len(tokens) + 1
    engine = Engine(loaded, CacheConfig(16, -(-len(tokens) // 16) + 2),
                    SchedulerConfig(max_num_batched_tokens=len(tokens), async_scheduling=False))  # step() waits
    engine.add_request(tokens, SamplingParams(max_new_tokens=1))
    if next(loaded.model.parameters()).is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    engine.step()  # prefill and the first token (one host read, which waits for the device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2040])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, attention_backend=args.backend)
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(2, loaded.config.vocab_size, (n,), generator=gen).tolist() for n in args.lengths}
    floor = loaded.model.backend.fresh_prefill_min_tokens
    for n in args.lengths:  # warm-up (allocator, kernels)
        prefill_s(loaded, prompts[n], True), prefill_s(loaded, prompts[n], False)
    times: dict[tuple[int, bool], list[float]] = {}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for n in args.lengths:
            for fresh in ((True, False) if r % 2 == 0 else (False, True)):
                times.setdefault((n, fresh), []).append(prefill_s(loaded, prompts[n], fresh))
    loaded.model.backend.fresh_prefill_min_tokens = floor
    rows = []
    print(f"backend {loaded.model.backend.name} on {args.device}, {args.threads} threads, {args.rounds} rounds "
          f"(its fresh-path threshold: {floor} tokens)")
    print(f"{'tokens':>7} {'paged ms':>9} {'fresh ms':>9} {'fresh/paged':>12}")
    for n in args.lengths:
        paged, fresh = (statistics.median(times[(n, f)]) * 1e3 for f in (False, True))
        rows.append({"tokens": n, "paged_ms": paged, "fresh_ms": fresh, "ratio": fresh / paged})
        print(f"{n:>7} {paged:>9.1f} {fresh:>9.1f} {fresh / paged:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": loaded.model.backend.name, "device": args.device, "threads": args.threads,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
