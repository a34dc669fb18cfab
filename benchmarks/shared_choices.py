"""A request's `n` choices with and without sharing the prompt's KV through the KV store, side by side; by hand.

    .venv/bin/python benchmarks/shared_choices.py [--n 4] [--words 600] [--rounds 3] [--out FILE.json]

Starts a colocated decode service (the bundled model, the embedded Redis as its KV-store index) and opens n greedy
choices of one fresh prompt as the gateway does (zeroc/gateway/choices.py `open_all`): together (`share` off: each
computes the prompt) or the first before the others (`share` on: they read its full blocks from the KV store).
Rounds alternate the two, each with a prompt no round sent before. Reported per mode: the time until every choice
has finished (median over rounds), the first and last choice's TTFT, and the prompt tokens the service computed
(prompt tokens minus those read from the store, summed over the choices).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

from zeroc.config import BUNDLED_HELDOUT
from zeroc.gateway.choices import choice_calls, open_all
from zeroc.gateway.replicas import Replicas, finish
from zeroc.stack import ServiceProcess


async def one_round(target: str, prompt: str, n: int, new_tokens: int, share: bool) -> dict:
    replicas = Replicas([target], timeout_s=600)
    sampling = {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True, "seed": None}
    try:
        start = time.perf_counter()
        opened = await open_all(replicas, choice_calls(sampling, [prompt], n, uuid.uuid4().hex), n, share)
        results = await asyncio.gather(*(finish(f, s) for f, s in opened))
        wall = time.perf_counter() - start
    finally:
        await replicas.close()
    ttft = sorted(r.usage.ttft_ms for r in results)
    return {"wall_s": wall, "ttft_first_ms": ttft[0], "ttft_last_ms": ttft[-1],
            "computed": sum(r.usage.prompt_tokens - r.usage.cached_prefix_tokens for r in results),
            "prompt_tokens": results[0].usage.prompt_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--words", type=int, default=600, help="held-out words in the prompt")
    ap.add_argument("--new", type=int, default=16, help="tokens each choice generates")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = " ".join(BUNDLED_HELDOUT.read_text().split()[: args.words])
    service = ServiceProcess("decode", ["--colocated"])
    rows: dict[str, list[dict]] = {"together": [], "shared": []}
    try:
        service.wait_serving()
        asyncio.run(one_round(service.address, "warm-up " + text[:200], 2, 2, True))
        for r in range(args.rounds):
            for mode in ("together", "shared"):
                prompt = f"[{uuid.uuid4().hex}] {text}"  # fresh: no earlier round's blocks match it
                rows[mode].append(asyncio.run(one_round(service.address, prompt, args.n, args.new, mode == "shared")))
                print(mode, r, json.dumps(rows[mode][-1]), flush=True)
    finally:
        service.stop()
    summary = {mode: {k: statistics.median(x[k] for x in got) for k in got[0]} for mode, got in rows.items()}
    summary["speedup"] = summary["together"]["wall_s"] / summary["shared"]["wall_s"]
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rounds": rows, "median": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
