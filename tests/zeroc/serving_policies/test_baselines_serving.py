"""StreamingLLM, SnapKV and Palu in the paged serving cache: each equal to its streaming evaluator."""

from __future__ import annotations

import pytest
import torch

from serving_runs import policy_cache, serve, stream
from zeroc.policies import PaluLowRank, SnapKV, StreamingLLM

CASES = [  # (policy name, evaluator, budget, model, prompt tokens, prefill splits)
    ("streamingllm", StreamingLLM, 0.5, "bundled", 60, [[60], [25, 1, 34]]),
    ("snapkv", SnapKV, 0.5, "bundled", 70, [[70], [40, 30]]),  # the 32-query window wraps its ring
    ("snapkv", SnapKV, 0.3, "random_gqa", 50, [[50]]),  # 4 query heads per KV head
    ("palu", PaluLowRank, 0.5, "bundled", 60, [[60], [25, 1, 34]]),
    ("palu", PaluLowRank, 0.25, "random_gqa", 40, [[40], [17, 23]]),  # llama3 RoPE scaling
]


@pytest.mark.parametrize("name,rule,budget,model_name,prompt,chunks", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_serving_equals_the_streaming_evaluator(request, heldout_ids, name, rule, budget, model_name, prompt,
                                                chunks):
    loaded = request.getfixturevalue(model_name)
    ids, steps = heldout_ids[:prompt], 8
    want_logits, want_tokens = stream(loaded.model, rule(budget=budget), ids, steps)
    plain, _ = serve(loaded.model, policy_cache(loaded, block_size=16, num_blocks=16), ids, steps, [prompt])
    gap = (want_logits - plain).abs().max()  # how far the policy moves the logits
    for split in chunks:
        cache = policy_cache(loaded, block_size=16, num_blocks=32, kv_policy=name, kv_budget=budget)
        logits, tokens = serve(loaded.model, cache, ids, steps, split)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        assert (logits - want_logits).abs().max() < gap / 100  # serving is the policy, not plain attention
        assert tokens == want_tokens
        cache.free("s")
        assert cache.num_free_blocks == cache.num_blocks
