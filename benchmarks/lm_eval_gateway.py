"""lm-evaluation-harness against the gateway, by hand: a multiple-choice task of held-out text, and a check of the
log-likelihoods it got against transformers' forward of the same model.

    .venv/bin/python benchmarks/lm_eval_gateway.py task /tmp/lmtask      # writes data.jsonl and zeroc_tiny_mc.yaml
    zeroc stack up --gateway                                              # prints the gateway's URL
    lm_eval --model local-completions --model_args model=zeroc-tiny,base_url=URL/v1/completions,\\
        tokenizer=models/zeroc-tiny,tokenizer_backend=huggingface,num_concurrent=2 --batch_size 4 \\
        --tasks zeroc_tiny_mc --include_path /tmp/lmtask --output_path /tmp/lmout --log_samples
    .venv/bin/python benchmarks/lm_eval_gateway.py check /tmp/lmout/zeroc-tiny/samples_zeroc_tiny_mc_*.jsonl

lm-eval (its own venv: `pip install "lm-eval[api]" transformers`) scores each choice with its loglikelihood request:
token ids of context + continuation, `echo`, `logprobs: 1`, `max_tokens: 1`, batches of `--batch_size` prompts; it
sums the continuation's entries. `check` recomputes each sum from transformers' logits and prints the largest gap.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from zeroc.config import BUNDLED_HELDOUT, BUNDLED_MODEL

TASK = """task: zeroc_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(out: Path, docs: int = 40) -> None:
    """`docs` items: 24 words of held-out text, its next 8 words among three 8-word spans from elsewhere."""
    words, rng = BUNDLED_HELDOUT.read_text().split(), random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w") as f:
        for i in range(docs):
            at = 200 + i * 60
            true = " " + " ".join(words[at + 24: at + 32])
            choices = [true] + [" " + " ".join(words[j: j + 8]) for j in rng.sample(range(len(words) - 8), 3)]
            rng.shuffle(choices)
            f.write(json.dumps({"context": " ".join(words[at: at + 24]), "choices": choices,
                                "label": choices.index(true)}) + "\n")
    (out / "zeroc_tiny_mc.yaml").write_text(TASK.format(data=out / "data.jsonl"))


def check(samples: Path) -> float:
    """The largest gap between lm-eval's log-likelihoods and transformers' for the same token ids."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(BUNDLED_MODEL))
    hf = LlamaForCausalLM.from_pretrained(str(BUNDLED_MODEL), dtype=torch.float32).eval()
    worst = 0.0
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        ctx = tok(s["doc"]["context"], add_special_tokens=False).input_ids  # as lm-eval splits context and choice
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            ids = ctx + tok(s["doc"]["context"] + choice, add_special_tokens=False).input_ids[len(ctx):]
            with torch.no_grad():
                logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [P, vocab]
            want = sum(logp[p - 1, ids[p]].item() for p in range(len(ctx), len(ids)))
            worst = max(worst, abs(want - float(resp[0][0])))
    return worst


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("task", "check"):
        print(__doc__)
        return 2
    if sys.argv[1] == "task":
        write_task(Path(sys.argv[2]))
    else:
        print(f"largest gap to transformers: {check(Path(sys.argv[2])):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
