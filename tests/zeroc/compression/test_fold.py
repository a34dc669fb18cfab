"""Folding math: exact at full rank (fold and rotate), RoPE-commuting pair selection, whitened PCA and
rotate-basis optimality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import ablation_pair_order, build_compressed, qk_factors, value_factors
from zeroc.config import AttentionCompression, RopeConfig
from zeroc.rope import apply_rope, rope_cos_sin, rope_inv_freq


def _full_layout(cfg, factors, mode):
    d = cfg.head_dim
    return AttentionCompression(tuple(f.layer_compression(d, d, mode) for f in factors), "full", 1.0)


@torch.inference_mode()
def test_full_rank_reproduces_logits(any_model):
    """Every pair kept (fold) or full-rank bases after RoPE (rotate), V/O folded at rank d: only the
    weights' basis changes, not the function."""
    model = any_model.model
    gen = torch.Generator().manual_seed(3)
    calib = torch.randint(0, model.config.vocab_size, (4, 128), generator=gen)
    # One window's activations rank the pairs: at full rank their order does not matter.
    factors = compute_factors(model, collect_statistics(model, calib, progress=False, sample_tokens=128))
    tokens = torch.randint(0, model.config.vocab_size, (2, 200), generator=gen)
    for mode in ("fold", "rotate"):
        folded = build_compressed(model, factors, _full_layout(model.config, factors, mode))
        assert all(layer.self_attn.rotate == (mode == "rotate") for layer in folded.model.layers)
        assert (folded(tokens) - model(tokens)).abs().max().item() < 1e-4, mode


@settings(max_examples=40, deadline=None)
@given(d=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 2**16),
       position=st.integers(0, 100_000), keep_frac=st.floats(0.1, 1.0))
def test_pair_selection_commutes_with_rope(d, seed, position, keep_frac):
    """RoPE on the kept pairs with their own frequencies == the kept dims of full RoPE."""
    gen = torch.Generator().manual_seed(seed)
    half = d // 2
    keep = torch.randperm(half, generator=gen)[: max(1, int(keep_frac * half))].sort().values
    x = torch.randn(3, d, generator=gen, dtype=torch.float64)
    inv = rope_inv_freq(RopeConfig(theta=10000.0), d).double()
    pos = torch.tensor(position)
    cos, sin = rope_cos_sin(inv[None], pos, torch.float64)  # [1, d]
    full = apply_rope(x, cos, sin)
    dims = torch.cat([keep, keep + half])
    cos_k, sin_k = rope_cos_sin(inv[keep][None], pos, torch.float64)
    torch.testing.assert_close(apply_rope(x[:, dims], cos_k, sin_k), full[:, dims], rtol=1e-9, atol=1e-9)


def test_whitened_pca_beats_plain_pca_through_w_o():
    """The V basis minimises the error seen through W_o; plain PCA of V is worse at every rank < d."""
    gen = torch.Generator().manual_seed(0)
    d, hidden, group = 16, 48, 2
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    values = torch.randn(4000, d, generator=gen, dtype=torch.float64) @ mix  # correlated values
    scales = torch.logspace(-1, 1, d, dtype=torch.float64)
    o_blocks = torch.randn(group, hidden, d, generator=gen, dtype=torch.float64) * scales  # anisotropic W_o
    cov = values.T @ values / len(values)
    down, up = value_factors(cov, o_blocks)

    def err(proj):  # sum_h E||W_o,h (v - P v)||^2
        resid = values - values @ proj.T
        return sum(((resid @ o.T) ** 2).sum() / len(values) for o in o_blocks).item()

    plain = torch.linalg.eigh(cov).eigenvectors.flip(-1)
    for r in range(1, d):
        ours = up[:, :r] @ down[:r]
        pca = plain[:, :r] @ plain[:, :r].T
        assert err(ours) < err(pca)
    torch.testing.assert_close(up @ down, torch.eye(d, dtype=torch.float64), atol=1e-8, rtol=0)


def test_rotate_bases_preserve_q_dot_k_better_than_a_shared_pca_basis():
    """A, B minimise E[(q.k - (A^T q).(B^T k))^2] for independent q, k; at rank d, A B^T = I."""
    gen = torch.Generator().manual_seed(1)
    d, group, n = 16, 3, 6000
    mix_q = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(-1, 0.5, d, dtype=torch.float64)
    mix_k = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(0.5, -1, d, dtype=torch.float64)
    q = torch.randn(group, n, d, generator=gen, dtype=torch.float64) @ mix_q  # the group's query heads
    k = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix_k
    q_cov = torch.einsum("hnd,hne->de", q, q) / n
    k_cov = k.T @ k / n
    a, b = qk_factors(q_cov, k_cov)

    def err(a_r, b_r):  # sum_h E over independent pairs (q_h, k) of the score error, exactly from moments
        m = torch.eye(d, dtype=torch.float64) - a_r @ b_r.T
        return torch.trace(m.T @ q_cov @ m @ k_cov).item()

    pca = torch.linalg.eigh(q_cov + k_cov).eigenvectors.flip(-1)  # one orthonormal basis for both
    for r in range(1, d):
        assert err(a[:, :r], b[:, :r]) < err(pca[:, :r], pca[:, :r])
        assert err(a[:, :r], b[:, :r]) <= err(a[:, :r - 1], b[:, :r - 1]) + 1e-12  # any prefix is a rank
    torch.testing.assert_close(a @ b.T, torch.eye(d, dtype=torch.float64), atol=1e-8, rtol=0)
    # Balanced: q' and k' have the same second moment per dim (the singular values).
    torch.testing.assert_close(torch.diagonal(a.T @ q_cov @ a), torch.diagonal(b.T @ k_cov @ b))


def test_ablation_ranks_the_pairs_that_carry_the_scores_first():
    """Keys live on pair 2 (strongly) and pair 0 (weakly): those rank first, the empty pairs last."""
    gen = torch.Generator().manual_seed(0)
    b, group, t, d = 2, 3, 40, 8  # pairs (i, i + 4), i = 0..3
    q = torch.randn(b, group, t, d, generator=gen) * 3
    k = torch.zeros(b, 1, t, d)
    k[..., [2, 6]] = torch.randn(b, 1, t, 2, generator=gen) * 2.0
    k[..., [0, 4]] = torch.randn(b, 1, t, 2, generator=gen) * 0.3
    v = torch.randn(b, 1, t, d, generator=gen)
    order = ablation_pair_order(q, k, v, torch.eye(d).expand(group, d, d), 1 / d ** 0.5).tolist()
    assert order[:2] == [2, 0] and sorted(order[2:]) == [1, 3]


def _ablation_reference(q, k, v, o_metric, scale):
    """The greedy ablation run directly: each candidate's attention on its kept dims (SDPA, a boolean causal mask)."""
    half, t = q.shape[-1] // 2, q.shape[-2]
    rows = torch.arange(3, t, 4)
    q, mask = q[..., rows, :], torch.arange(t)[None, :] <= rows[:, None]
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def error(keep):
        dims = keep + [i + half for i in keep]
        e = F.scaled_dot_product_attention(q[..., dims], k[..., dims], v, attn_mask=mask, scale=scale) - full
        return torch.einsum("bhtd,hde,bhte->", e, o_metric, e).item()

    keep, dropped = list(range(half)), []
    while len(keep) > 1:
        cheapest = min(keep, key=lambda j: error([i for i in keep if i != j]))
        keep.remove(cheapest)
        dropped.append(cheapest)
    return keep + dropped[::-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ablation_drops_the_pairs_the_direct_greedy_drops(seed):
    """Scores summed from per-pair shares, candidates a few at a time: the order of running each candidate's
    attention on its own kept dims, on random activations of two windows and a group of three heads."""
    gen = torch.Generator().manual_seed(seed)
    b, group, t, d = 2, 3, 48, 16
    q, k, v = (torch.randn(b, n, t, d, generator=gen) for n in (group, 1, 1))
    k = k * torch.linspace(0.2, 2.0, d)  # pairs of unequal weight, so that no two candidates tie
    w = torch.randn(group, 24, d, generator=gen)
    metric = torch.einsum("hod,hoe->hde", w, w)
    assert ablation_pair_order(q, k, v, metric, d ** -0.5).tolist() == _ablation_reference(q, k, v, metric, d ** -0.5)
