"""Requests cut from the held-out text: real text, the preset's lengths, shared prefixes, context fits."""

from __future__ import annotations

import numpy as np
import pytest

from zeroc.bench.serve.load import TraceEntry
from zeroc.bench.serve.workloads import LengthDist, build_requests, preset, text_tokens
from zeroc.config import BUNDLED_HELDOUT, ZeroCError

CTX = 2048


@pytest.fixture(scope="module")
def tokens(bundled):
    return text_tokens(bundled.tokenizer, BUNDLED_HELDOUT)


def test_prompts_are_held_out_text_behind_bos(bundled, tokens):
    reqs = build_requests(preset("chat", CTX), tokens, 20, CTX, bundled.tokenizer.bos_id, seed=1)
    doubled = np.concatenate([tokens, tokens])  # a slice may wrap round the end of the text
    for r in reqs:
        assert r.prompt_ids[0] == bundled.tokenizer.bos_id
        body = np.array(r.prompt_ids[1:])
        starts = np.flatnonzero(tokens == body[0])
        assert any(np.array_equal(doubled[s:s + body.size], body) for s in starts)  # a run of the text's tokens
    sample = bundled.tokenizer.decode(reqs[0].prompt_ids[1:40]).strip()
    assert sample and sample[:20] in BUNDLED_HELDOUT.read_text()


def test_preset_lengths_and_context(bundled, tokens):
    chat = build_requests(preset("chat", CTX), tokens, 400, CTX, bundled.tokenizer.bos_id)
    p = np.array([len(r.prompt_ids) - 1 for r in chat])
    o = np.array([r.max_tokens for r in chat])
    assert 4 <= p.min() and p.max() <= CTX // 2 and 4 <= o.min() and o.max() <= CTX // 6
    assert 0.7 * (CTX // 16) < np.median(p) < 1.3 * (CTX // 16)  # lognormal around the median
    assert 0.7 * (CTX // 20) < np.median(o) < 1.3 * (CTX // 20)
    long = build_requests(preset("long", CTX), tokens, 100, CTX, bundled.tokenizer.bos_id)
    lp = np.array([len(r.prompt_ids) for r in long])
    assert lp.min() >= 0.7 * CTX and lp.max() <= 0.88 * CTX + 1
    for r in chat + long:
        assert len(r.prompt_ids) + r.max_tokens <= CTX and r.max_tokens >= 1


def test_prefix_workload_shares_a_few_long_prefixes(bundled, tokens):
    spec = preset("prefix", CTX)
    reqs = build_requests(spec, tokens, 40, CTX, bundled.tokenizer.bos_id, seed=3)
    n = 1 + spec.prefix_tokens
    heads = {}
    for r in reqs:
        heads.setdefault(r.prefix_id, set()).add(tuple(r.prompt_ids[:n]))
    assert 1 < len(heads) <= spec.shared_prefixes
    assert all(len(v) == 1 for v in heads.values())  # one prefix per id
    assert len({h for v in heads.values() for h in v}) == len(heads)  # different ids, different prefixes
    tails = {tuple(r.prompt_ids[n:]) for r in reqs}
    assert len(tails) == len(reqs)  # every request has its own suffix


def test_caps_and_trace_lengths(bundled, tokens):
    capped = build_requests(preset("long", CTX, max_prompt=48, max_output=8), tokens, 5, CTX, 1)
    assert all(len(r.prompt_ids) == 49 and r.max_tokens == 8 for r in capped)
    trace = [TraceEntry(0.0, 30, 5), TraceEntry(1.0, None, 3), TraceEntry(2.0, 5000, 100)]
    reqs = build_requests(preset("chat", CTX), tokens, 3, CTX, 1, trace=trace)
    assert (len(reqs[0].prompt_ids), reqs[0].max_tokens) == (31, 5)
    assert reqs[1].max_tokens == 3
    assert len(reqs[2].prompt_ids) == CTX - 1 and reqs[2].max_tokens == 1  # clipped to the context


def test_bad_inputs(tmp_path, bundled):
    with pytest.raises(ValueError):
        LengthDist(10, 0.5, 20, 30)
    with pytest.raises(ZeroCError, match="unknown workload"):
        preset("sharegpt", CTX)
    short = tmp_path / "short.txt"
    short.write_text("a b")
    with pytest.raises(ZeroCError, match="at least 64"):
        text_tokens(bundled.tokenizer, short)
    with pytest.raises(ZeroCError, match="cannot read"):
        text_tokens(bundled.tokenizer, tmp_path / "missing.txt")
