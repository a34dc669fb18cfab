"""Paired differences between methods on the same windows: the standard-error maths, the tie rule, and
budget 1 (where every baseline stores the whole cache) giving no difference under both protocols."""

from __future__ import annotations

import math
import statistics

import pytest

from zeroc.config import BUNDLED_HELDOUT
from zeroc.data import read_eval_tokens
from zeroc.eval.paired import paired_difference
from zeroc.eval.quality import QualityConfig, _method_row, _protocols, _row
from zeroc.eval.quality_report import diff_table, paired, paired_checks
from zeroc.policies import BASELINES


def test_equal_windows_give_the_textbook_paired_standard_error():
    a, b = [3.1, 2.9, 3.4, 3.0, 3.3], [3.0, 2.85, 3.3, 2.9, 3.25]
    d = [x - y for x, y in zip(a, b)]
    r = paired_difference(a, b, [256] * 5)
    assert r.mean == pytest.approx(statistics.fmean(d))
    assert r.se == pytest.approx(statistics.stdev(d) / math.sqrt(5))
    assert r.pct == pytest.approx(100 * (math.exp(statistics.fmean(d)) - 1))
    assert r.windows == 5 and not r.tie  # mean 0.09, se 0.01: beyond 2 standard errors


def test_token_weighted_mean_is_the_perplexity_ratio():
    a, b, n = [2.0, 4.0], [2.5, 3.0], [300, 100]
    r = paired_difference(a, b, n)
    ppl_a = math.exp((2.0 * 300 + 4.0 * 100) / 400)
    ppl_b = math.exp((2.5 * 300 + 3.0 * 100) / 400)
    assert r.pct == pytest.approx(100 * (ppl_a / ppl_b - 1))


def test_a_difference_inside_two_standard_errors_is_a_tie():
    noisy = paired_difference([1.0, 1.2, 0.9, 1.1], [1.05, 1.0, 1.0, 1.1], [10] * 4)
    assert abs(noisy.mean) <= 2 * noisy.se and noisy.tie and noisy.describe().endswith("(tie)")
    clear = paired_difference([1.1, 1.2, 1.15, 1.1], [1.0, 1.1, 1.05, 1.0], [10] * 4)
    assert not clear.tie and clear.describe().startswith("+")
    assert paired_difference([1.0], [1.0], [5]).tie and paired_difference([1.0], [1.0], [5]).se is None
    assert not paired_difference([1.5], [1.0], [5]).tie  # one window: no standard error, a real difference
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0], [1])


def test_budget_one_costs_nothing_under_both_protocols(bundled):
    cfg = QualityConfig(ctx=32, batch_size=3, prefill_tokens=24, score_tokens=8)
    tokens = read_eval_tokens(bundled.tokenizer, BUNDLED_HELDOUT, 32 * 3)
    rows = [_row("uncompressed", 1.0, *_protocols(bundled.model, tokens, cfg))]
    rows += [_method_row(bundled.model, tokens, name, 1.0, cfg) for name in BASELINES]
    for name in BASELINES:
        for protocol in ("streaming", "prefill"):
            d = paired(rows, name, "uncompressed", 1.0, protocol)
            assert d.windows == 3 and abs(d.pct) < 1e-3 and d.tie, (name, protocol, d)
    table = diff_table(rows, "prefill")
    assert len(table) == 2 + len(BASELINES) and "(tie)" in table[2]
    # a compressing method is measured against the same windows and (here) loses clearly
    rows.append(_method_row(bundled.model, tokens, "streamingllm", 0.25, cfg))
    rows.append(_row("zeroc", 0.25, *_protocols(bundled.model, tokens, cfg)))
    d = paired(rows, "streamingllm", "zeroc", 0.25, "streaming")
    assert d.mean > 0
    assert any(line.startswith("- streaming, b=0.25: zeroc is ahead of") for line in paired_checks(rows))
