"""Speculative decoding by n-gram lookup against vLLM's ("ngram") on this CPU, side by side in one run. By hand.

    .venv/bin/python benchmarks/speculative.py [--k 4] [--temperature 0] [--out docs/benchmarks/speculative.json]

Both sides run the bundled model in fp32, greedy (or sampled at `--temperature`, seed 0 on each request: both sides
then use rejection sampling), `new_tokens` new tokens per prompt (ignore_eos), with and without
speculation (k drafted tokens, n-grams of 4 down to 2), on two sets of prompts: held-out text, and text that
repeats (a code block written out twice, then its start again), one prompt at a time (batch 1, as one interactive
user) and all at once, `rounds` times (ZeroC's two settings interleaved in one process; vLLM's in a process each),
medians reported. Per row: output tok/s, and for ZeroC the tokens a speculating step gave (1 to k + 1) and
whether its tokens are the ones it makes without speculation (they must be, seeded sampling too) and, greedy, how
many are vLLM's with it (sampled, the two sides' generators differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_vllm import ensure_vllm, greedy_prompts, report, run_vllm, side_by_side_args  # noqa: E402

from zeroc.config import BUNDLED_MODEL  # noqa: E402

VLLM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    if __name__ == "__main__":
        model, sets, new, k = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        temperature = float(sys.argv[6])
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
        llm = LLM(model=model, dtype="float32", max_model_len=2048, seed=0, speculative_config=spec if k else None)
        sp = SamplingParams(max_tokens=new, ignore_eos=True, temperature=temperature, seed=0 if temperature else None)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in sets["held-out"][:2]], sp, use_tqdm=False)
        out = {name: {"batch1_tok_s": [], "batch_tok_s": []} for name in sets}
        for _ in range(int(sys.argv[5])):
            for name, prompts in sets.items():
                batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
                t = time.perf_counter()
                alone = [llm.generate([p], sp, use_tqdm=False)[0] for p in batch]
                out[name]["batch1_tok_s"].append(len(batch) * new / (time.perf_counter() - t))
                t = time.perf_counter()
                together = llm.generate(batch, sp, use_tqdm=False)
                out[name]["batch_tok_s"].append(len(batch) * new / (time.perf_counter() - t))
                out[name]["tokens"] = [list(o.outputs[0].token_ids) for o in together]
        print("RESULT " + json.dumps(out))
""")


def prompt_sets(n: int, words: int) -> dict[str, list[list[int]]]:
    from zeroc.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(BUNDLED_MODEL)
    code = ["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n",
            "class Point:\n    def __init__(self, x):\n        self.x = x\n", "import os\nprint(os.getcwd())\n"]
    repeating = [tok.encode(c * 2 + c[: len(c) // 2]) for c in (code * n)[:n]]
    return {"held-out": greedy_prompts(n, words), "repeating": repeating}


def zeroc_side(sets: dict, new: int, ks: tuple[int, int], threads: int, rounds: int, temperature: float) -> dict:
    """Both settings' rows, their rounds interleaved (this VM's speed drifts by tens of percent)."""
    import torch

    from zeroc.config import CacheConfig, SchedulerConfig
    from zeroc.engine import Engine
    from zeroc.loader import load_model
    from zeroc.sampling import SamplingParams

    torch.set_num_threads(threads)
    model = load_model(BUNDLED_MODEL)
    sp = SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=temperature, seed=0 if temperature else None)
    engines = {k: Engine(model, CacheConfig(num_bytes=1 << 30), SchedulerConfig(speculative_tokens=k)) for k in ks}
    out = {k: {name: {"batch1_tok_s": [], "batch_tok_s": []} for name in sets} for k in ks}
    for engine in engines.values():
        engine.generate(sets["held-out"][:2], sp)  # warm-up
    for _ in range(rounds):
        for k, engine in engines.items():
            for name, prompts in sets.items():
                row, t, events = out[k][name], time.perf_counter(), 0
                for p in prompts:
                    rid = engine.add_request(p, sp)
                    while engine.has_unfinished():
                        events += sum(1 for o in engine.step() if o.request_id == rid and o.token_ids)
                row["batch1_tok_s"].append(len(prompts) * new / (time.perf_counter() - t))
                t = time.perf_counter()
                row["tokens"] = [o.token_ids for o in engine.generate(prompts, sp)]
                row["batch_tok_s"].append(len(prompts) * new / (time.perf_counter() - t))
                row["tokens_per_step"] = len(prompts) * new / events
    return {f"zeroc k={k}": row for k, row in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    side_by_side_args(ap, words=48)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each measurement; the median is reported")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling at it")
    ap.set_defaults(prompts=8)
    args = ap.parse_args()
    py = ensure_vllm(Path(args.vllm_venv), args.torch_wheel)
    sets = prompt_sets(args.prompts, args.words)
    rows = {f"vllm k={k}": run_vllm(py, VLLM_SCRIPT, [str(BUNDLED_MODEL), json.dumps(sets), str(args.new_tokens),
                                                      str(k), str(args.rounds), str(args.temperature)],
                                       args.kv_gib, args.threads)
            for k in (0, args.k)}
    rows.update(zeroc_side(sets, args.new_tokens, (0, args.k), args.threads, args.rounds, args.temperature))
    plain, spec, vllm_spec = rows["zeroc k=0"], rows[f"zeroc k={args.k}"], rows[f"vllm k={args.k}"]
    for name in sets:
        spec[name]["same_as_without"] = spec[name]["tokens"] == plain[name]["tokens"]
        if not args.temperature:
            spec[name]["same_as_vllm"] = sum(a == b for a, b in zip(spec[name]["tokens"], vllm_spec[name]["tokens"]))
    for row in rows.values():
        for stats in row.values():
            stats.pop("tokens")
            for key in ("batch1_tok_s", "batch_tok_s"):
                stats[key] = statistics.median(stats[key])
    for name in sets:
        for key in ("batch1_tok_s", "batch_tok_s"):
            spec[name][f"{key}_vs_vllm"] = spec[name][key] / vllm_spec[name][key]
            spec[name][f"{key}_vs_without"] = spec[name][key] / plain[name][key]
            vllm_spec[name][f"{key}_vs_without"] = vllm_spec[name][key] / rows["vllm k=0"][name][key]
    return report({"temperature": args.temperature, "rows": rows}, args)


if __name__ == "__main__":
    raise SystemExit(main())
