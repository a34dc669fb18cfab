"""Palu low-rank: exact at full rank, exact for keys that lie in the kept subspace, r/d of the bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroc.config import RopeConfig
from zeroc.rope import apply_rope, rope_cos_sin, rope_inv_freq
from oracle.base import LayerGeometry, attend_dense, full_bits
from oracle.palu import PaluCache, PaluLowRank, weight_basis

D, HIDDEN, KV = 16, 24, 2
GEOM = LayerGeometry(layer=0, heads=4, kv_heads=KV, k_dim=D, v_dim=D)
INV_FREQ = rope_inv_freq(RopeConfig(theta=100.0), D)[None]  # [1, D/2]: fast rotations, so RoPE matters


def run(basis_k, basis_v, steps=12, weight_k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = PaluCache(GEOM, 1, basis_k, basis_v, INV_FREQ)
    ks, vs, outs = [], [], []
    for t in range(steps):
        x = torch.randn(HIDDEN, generator=g, dtype=torch.float64)
        k_pre = (weight_k @ x).view(1, KV, D) if weight_k is not None else torch.randn(1, KV, D, generator=g,
                                                                                      dtype=torch.float64)
        cos, sin = rope_cos_sin(INV_FREQ, torch.tensor(t), torch.float64)
        k = apply_rope(k_pre, cos, sin)
        v = torch.randn(1, KV, D, generator=g, dtype=torch.float64)
        q = torch.randn(1, 4, D, generator=g, dtype=torch.float64)
        outs.append(cache.step(q, k, v, 0.25, t))
        ks.append(k), vs.append(v)
    return cache, q, torch.stack(ks, 2), torch.stack(vs, 2), outs[-1]


def test_full_rank_reproduces_attention():
    w = torch.randn(KV * D, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    basis = weight_basis(w, KV, D)
    assert torch.allclose(basis.transpose(1, 2) @ basis, torch.eye(D, dtype=torch.float64).expand(KV, D, D), atol=1e-12)
    cache, q, ks, vs, out = run(basis, basis)
    assert torch.allclose(out, attend_dense(q, ks, vs, 0.25)[0], atol=1e-10)
    assert cache.stored_bits() == full_bits(GEOM, 12)


def test_keys_in_the_weights_rank_are_kept_exactly_and_values_are_projected():
    g = torch.Generator().manual_seed(2)
    w_k = torch.randn(KV * D, 4, dtype=torch.float64, generator=g) @ torch.randn(4, HIDDEN, dtype=torch.float64,
                                                                                generator=g)  # rank 4 per head
    r = PaluLowRank(budget=0.25).rank(D)
    assert r == 4
    k_basis = weight_basis(w_k, KV, r)
    w_v = torch.randn(KV * D, HIDDEN, dtype=torch.float64, generator=g)
    v_basis = weight_basis(w_v, KV, r)
    cache, q, ks, vs, out = run(k_basis, v_basis, weight_k=w_k, seed=3)
    # Independent oracle: numpy's SVD of each head's W_v block, values projected on its top r directions.
    u = [np.linalg.svd(w_v.view(KV, D, HIDDEN)[h].numpy())[0][:, :r] for h in range(KV)]
    v_proj = torch.stack([vs[:, h] @ torch.from_numpy(u[h] @ u[h].T) for h in range(KV)], dim=1)
    assert torch.allclose(out, attend_dense(q, ks, v_proj, 0.25)[0], atol=1e-10)  # K exact: it lies in span(U_r)
    assert cache.stored_bits() == pytest.approx(0.25 * full_bits(GEOM, 12))


def test_a_compressed_model_is_refused(random_gqa):
    PaluLowRank(budget=0.5).prepare(random_gqa.model)  # uncompressed: fine
    from zeroc.config import AttentionCompression, LayerCompression, ModelConfig
    from zeroc.model import Transformer

    cfg = random_gqa.config
    comp = AttentionCompression(tuple(LayerCompression(((0, 1),) * cfg.num_key_value_heads, 8)
                                      for _ in range(cfg.num_hidden_layers)), "x", 0.5)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**{**cfg.__dict__, "compression": comp}))
    with pytest.raises(ValueError, match="uncompressed"):
        PaluLowRank(budget=0.5).prepare(model)
