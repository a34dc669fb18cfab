"""StreamingLLM, H2O and SnapKV on small hand-made streams, against straightforward list-based oracles."""

from __future__ import annotations

import math

import pytest
import torch

from zeroc.policies.h2o import H2O
from zeroc.policies.snapkv import SnapKV
from zeroc.policies.streaming_llm import StreamingLLM
from zeroc.policies.base import eviction_keep
from zeroc.policies.eviction_rule import EvictionCache, EvictionState, LayerGeometry

GEOM = LayerGeometry(layer=0, heads=2, kv_heads=1, k_dim=4, v_dim=3)  # a GQA group of 2 query heads
SCALE = 0.5


def stream(seed: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(steps, 1, GEOM.heads, GEOM.k_dim, generator=g, dtype=torch.float64)  # [T, B=1, heads, dk]
    k = torch.randn(steps, 1, GEOM.kv_heads, GEOM.k_dim, generator=g, dtype=torch.float64)
    v = torch.randn(steps, 1, GEOM.kv_heads, GEOM.v_dim, generator=g, dtype=torch.float64)
    return q, k, v


def run(policy, q, k, v):
    """Feed the stream; -> (kept positions after each step, outputs [T, heads, dv])."""
    cache = EvictionCache(policy, GEOM, batch=1, dtype=torch.float64)
    kept, outs = [], []
    for t in range(q.shape[0]):
        outs.append(cache.step(q[t], k[t], v[t], SCALE, t)[0])
        kept.append(cache.kept_positions()[0, 0].tolist())
    return kept, torch.stack(outs)


def dense_attention(q, k, v, positions):
    # q: [heads, dk] of one step; k, v: [T, 1, 1, d] whole stream -> [heads, dv] over `positions` only
    keys, vals = k[positions, 0, 0], v[positions, 0, 0]
    return torch.softmax(q @ keys.T * SCALE, dim=-1) @ vals


def test_keep_count_is_floor_of_budget_times_tokens_with_a_floor():
    assert [eviction_keep(t, 0.5, 3) for t in (1, 2, 5, 6, 7, 8, 20, 21)] == [1, 2, 3, 3, 3, 4, 10, 10]
    assert [eviction_keep(t, 1.0, 1) for t in (1, 7, 100)] == [1, 7, 100]
    # H2O's fixed budget caps the count: floor(0.5 t), then at most 8
    assert [H2O(budget=0.5, max_tokens=8).keep(t) for t in (1, 10, 16, 17, 100)] == [1, 5, 8, 8, 8]


def test_streaming_llm_keeps_sinks_and_the_latest_tokens():
    q, k, v = stream(0, 20)
    kept, outs = run(StreamingLLM(budget=0.5, sinks=2), q, k, v)
    assert kept[19] == [0, 1] + list(range(12, 20))  # t=20: floor(10) tokens = 2 sinks + 8 latest
    assert kept[4] == [0, 1, 4]  # t=5: floor(2.5) < sinks + current token, so that floor (3) holds
    for t in range(20):
        n = eviction_keep(t + 1, 0.5, 3)
        expect = list(range(min(2, n))) + list(range(t + 1 - (n - 2), t + 1))
        assert kept[t] == expect
        assert torch.allclose(outs[t], dense_attention(q[t, 0], k, v, expect), atol=1e-12)


def h2o_oracle(q, k, budget, ratio):
    kept, score, history = [], {}, []
    for t in range(q.shape[0]):
        keep = eviction_keep(t + 1, budget, 1)
        if len(kept) + 1 > keep:
            recent = max(1, math.ceil(ratio * keep))
            victim = min((p for p in kept if p < t + 1 - recent), key=lambda p: (score[p], p))
            kept.remove(victim)
        kept.append(t)
        score[t] = 0.0
        probs = torch.softmax(q[t, 0] @ k[kept, 0, 0].T * SCALE, dim=-1)  # [heads, n]
        for p, pr in zip(kept, probs.sum(0).tolist()):
            score[p] += pr
        history.append(sorted(kept))
    return history


def test_h2o_keeps_a_heavy_hitter_and_matches_the_oracle():
    q, k, v = stream(1, 40)
    q[:, :, :, 0] = 3.0
    k[4, 0, 0, 0] = 4.0  # token 4 aligns with every later query: it must survive as a heavy hitter
    kept, outs = run(H2O(budget=0.5, recent_ratio=0.5), q, k, v)
    assert 4 in kept[39] and len(kept[39]) == 20
    assert set(range(30, 40)) <= set(kept[39])  # ceil(0.5 * 20) recent tokens
    assert kept == h2o_oracle(q, k, 0.5, 0.5)
    assert torch.allclose(outs[39], dense_attention(q[39, 0], k, v, kept[39]), atol=1e-12)


def snapkv_oracle(q, k, budget, window, kernel):
    kept, history = [], []
    for t in range(q.shape[0]):
        keep = eviction_keep(t + 1, budget, 1)
        if len(kept) + 1 > keep:
            order = sorted(kept)
            votes = []
            for p in order:
                vote = 0.0
                for qp in range(max(0, t + 1 - window), t + 1):
                    visible = [x for x in order if x <= qp]
                    if p in visible:
                        probs = torch.softmax(q[qp, 0] @ k[visible, 0, 0].T * SCALE, dim=-1)
                        vote += probs[:, visible.index(p)].sum().item()
                votes.append(vote)
            half = kernel // 2
            pooled = {p: max(votes[max(0, i - half): i + half + 1]) for i, p in enumerate(order)}
            protected = min(window, keep)
            victim = min((p for p in kept if p < t + 1 - protected), key=lambda p: (pooled[p], p))
            kept.remove(victim)
        kept.append(t)
        history.append(sorted(kept))
    return history


def test_snapkv_matches_the_oracle():
    q, k, v = stream(2, 36)
    kept, outs = run(SnapKV(budget=0.5, window=4, kernel=3), q, k, v)
    assert kept == snapkv_oracle(q, k, 0.5, 4, 3)
    assert set(range(32, 36)) <= set(kept[35]) and len(kept[35]) == 18
    assert torch.allclose(outs[35], dense_attention(q[35, 0], k, v, kept[35]), atol=1e-12)


def test_snapkv_pooling_spreads_a_vote_to_neighbours():
    # 5 kept tokens (stored out of order); one window query that looks only at position 2.
    pos = torch.tensor([3, 0, 2, 4, 1])
    k = torch.zeros(1, 1, 5, 2, dtype=torch.float64)
    k[0, 0, 2, 0] = 50.0
    q = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    q[:, :, :, 0] = 1.0
    state = EvictionState(k=k, v=torch.zeros(1, 1, 5, 1), pos=pos.view(1, 1, 5), score=torch.zeros(1, 1, 5),
                          queries=q, query_pos=torch.tensor([4]), n=5, seen=5, scale=1.0)
    no_pool = SnapKV(window=1, kernel=1).votes(state)[0, 0]
    pooled = SnapKV(window=1, kernel=3).votes(state)[0, 0]
    assert no_pool.argmax().item() == 2 and no_pool[2].item() == pytest.approx(2.0)  # 2 heads, all weight
    by_pos = {int(p): float(x) for p, x in zip(pos, pooled)}
    assert by_pos[1] == by_pos[2] == by_pos[3] == pytest.approx(2.0)  # neighbours 1 and 3 share the peak
    assert by_pos[0] < 1e-6 and by_pos[4] < 1e-6


@pytest.mark.parametrize("bad, match", [
    (lambda: StreamingLLM(budget=0.0), "budget"), (lambda: StreamingLLM(budget=1.5), "budget"),
    (lambda: StreamingLLM(sinks=0), "sink"), (lambda: H2O(recent_ratio=0.0), "recent_ratio"),
    (lambda: SnapKV(window=0), "window"), (lambda: SnapKV(kernel=4), "odd"),
    (lambda: H2O(max_tokens=-1), "max_tokens"),  # 0: no cap
])
def test_bad_hyperparameters_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
