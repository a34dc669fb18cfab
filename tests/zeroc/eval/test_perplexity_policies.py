"""Streaming perplexity through a KV method's paged store (the cache `zeroc serve` runs): identity at budget
1.0, a whole-model oracle for StreamingLLM, and the KV held within the budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroc.config import BUNDLED_HELDOUT, CacheConfig
from zeroc.eval.perplexity import perplexity_streaming
from zeroc.data import read_eval_tokens, windows_of
from zeroc.policies import POLICY_NAMES, cache_config, make_policy, method_at_budget
from zeroc.policies.base import eviction_keep
from zeroc.policies.streaming_llm import StreamingLLM


def with_method(loaded, tokens, ctx, method, batch_size=16):
    return perplexity_streaming(loaded.model, tokens, ctx, batch_size, progress=False, cache=cache_config(method))


@pytest.fixture(scope="module", params=["bundled", "random_gqa"])
def model_and_tokens(request):
    loaded = request.getfixturevalue(request.param)
    tokens = read_eval_tokens(loaded.tokenizer, BUNDLED_HELDOUT, max_tokens=180)
    ref = perplexity_streaming(loaded.model, tokens, ctx=64, batch_size=4, progress=False)
    return loaded, tokens, ref


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "int8"])  # int8 always quantises
def test_budget_one_reproduces_the_plain_streaming_perplexity(model_and_tokens, name):
    loaded, tokens, ref = model_and_tokens
    res = with_method(loaded, tokens, 64, method_at_budget(name, 1.0, loaded.config, 64), batch_size=4)
    assert res.tokens == ref.tokens and res.windows == ref.windows
    assert abs(res.perplexity - ref.perplexity) / ref.perplexity < 1e-3
    assert res.kv_fraction_mean == pytest.approx(1.0)


def streaming_llm_oracle(model, window: torch.Tensor, budget: float, sinks: int) -> tuple[float, int]:
    """One dense pass whose attention mask is StreamingLLM's kept set at every position -> (nll sum, count)."""
    n = window.numel() - 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        keep = eviction_keep(t + 1, budget, sinks + 1)
        mask[t, : min(sinks, keep)] = True
        mask[t, t + 1 - (keep - sinks): t + 1] = True

    def attend(_layer, q, k, v, scale):
        # q: [n, heads, dq]; k: [n, kv, dq]; v: [n, kv, dv]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)

    with torch.no_grad():
        logits = model.forward_attend(window[:-1], torch.arange(n), attend)
    return F.cross_entropy(logits.float(), window[1:], reduction="sum").item(), n


def test_streaming_llm_equals_a_masked_dense_pass(random_gqa):
    tokens = read_eval_tokens(random_gqa.tokenizer, BUNDLED_HELDOUT, max_tokens=160)
    res = with_method(random_gqa, tokens, 80, StreamingLLM(budget=0.375))
    nll, count = 0.0, 0
    for w in windows_of(tokens, 80):
        a, b = streaming_llm_oracle(random_gqa.model, w, 0.375, 4)
        nll, count = nll + a, count + b
    assert res.tokens == count
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.fixture(scope="module")
def long_window(random_gqa):
    tokens = read_eval_tokens(random_gqa.tokenizer, BUNDLED_HELDOUT, max_tokens=200)
    return tokens, perplexity_streaming(random_gqa.model, tokens, 200, progress=False).perplexity


# KIVI holds its budget at the window's length (its full-precision residual is fixed, so earlier positions
# hold more): tests/zeroc/policies/test_conformance.py checks it there.
@pytest.mark.parametrize("name", ["streamingllm", "h2o", "snapkv", "palu"])
def test_policies_hold_no_more_than_the_budget(random_gqa, long_window, name):
    tokens, full = long_window
    res = with_method(random_gqa, tokens, 200, method_at_budget(name, 0.5, random_gqa.config, 200))
    assert res.kv_fraction_max is not None and res.kv_fraction_max <= 0.5 + 1e-9  # positions 128..199
    assert res.kv_fraction_mean <= 0.55  # early positions may exceed (floors), on average barely
    assert res.perplexity != pytest.approx(full, rel=1e-6)  # the policy did change attention


def test_hyperparameters_the_cache_settings_cannot_name_are_refused():
    with pytest.raises(ValueError, match="what the cache settings can name"):
        cache_config(StreamingLLM(budget=0.5, sinks=3))


def test_unknown_policy_names_are_refused():
    with pytest.raises(ValueError, match="unknown KV policy 'lru'"):
        make_policy(CacheConfig(kv_policy="lru"))
    with pytest.raises(ValueError, match="budget"):
        make_policy(CacheConfig(kv_policy="h2o", kv_budget=0.0))
