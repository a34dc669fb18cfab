"""Palu-style low-rank KV (Chang et al., 2024): cache a pre-RoPE latent, rebuild K at attention time.

Per KV head g, W_k,g (head_dim x hidden) = U S V^T; the cache stores the latent U_r^T k_pre
(r = floor(budget * head_dim) numbers per token instead of head_dim), and attention rebuilds
k_pre ~ U_r U_r^T k_pre and applies RoPE at the token's position — the per-token, per-step work
ZeroC's fold mode avoids. Values likewise with W_v,g's basis (Palu folds U_r into W_o; the
numbers are the same). The bases come from the weights alone (plain SVD, no whitening), so no
calibration text is needed.

The model hands the cache post-RoPE keys; RoPE is a rotation, so the pre-RoPE key is recovered
exactly by rotating back by the token's angle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.policies.palu import Palu, weight_basis
from zeroc.rope import apply_rope, rope_cos_sin
from oracle.base import (REFERENCE_BITS, KVPolicy, LayerGeometry, LayerKVCache, attend_dense,
                                 layer_geometry)
from zeroc.policies.eviction_rule import grow

if TYPE_CHECKING:  # annotations only: the model sits above the policies
    from zeroc.model import Transformer


@dataclass(frozen=True)
class PaluLowRank(KVPolicy):
    budget: float = 1.0

    name = "palu"

    def __post_init__(self) -> None:
        Palu(self.budget)  # the product's budget validation

    def rank(self, head_dim: int) -> int:
        """The product method's rank rule: the oracle checks the rest."""
        return Palu(self.budget).rank(head_dim)

    def prepare(self, model: Transformer) -> None:
        if model.config.compression is not None:
            raise ValueError("the Palu baseline applies to an uncompressed model; this one is already compressed")

    def new_cache(self, model: Transformer, layer: int, batch: int) -> LayerKVCache:
        self.prepare(model)
        attn = model.model.layers[layer].self_attn
        geom = layer_geometry(model, layer)
        k_basis = weight_basis(attn.k_proj.weight, geom.kv_heads, self.rank(geom.k_dim))
        v_basis = weight_basis(attn.v_proj.weight, geom.kv_heads, self.rank(geom.v_dim))
        return PaluCache(geom, batch, k_basis, v_basis, attn.inv_freq)


class PaluCache(LayerKVCache):
    def __init__(self, geom: LayerGeometry, batch: int, k_basis: Tensor, v_basis: Tensor, inv_freq: Tensor):
        # k_basis: [kv, dk, rk]; v_basis: [kv, dv, rv]; inv_freq: [1, dk / 2]
        self.geom, self.k_basis, self.v_basis, self.inv_freq = geom, k_basis, v_basis, inv_freq
        dtype = k_basis.dtype
        self.k_latent = torch.zeros(batch, geom.kv_heads, 0, k_basis.shape[-1], dtype=dtype)  # [B, kv, t, rk]
        self.v_latent = torch.zeros(batch, geom.kv_heads, 0, v_basis.shape[-1], dtype=dtype)  # [B, kv, t, rv]
        # Rebuilt (K: and RoPE'd) tokens: each depends only on its own latent and position, so
        # rebuilding a token once when it arrives gives exactly what rebuilding every step would.
        self.k_rebuilt = torch.zeros(batch, geom.kv_heads, 0, geom.k_dim, dtype=dtype)  # [B, kv, t, dk]
        self.v_rebuilt = torch.zeros(batch, geom.kv_heads, 0, geom.v_dim, dtype=dtype)  # [B, kv, t, dv]
        self.tokens = 0  # live slots of every buffer (capacity grows geometrically)

    def step(self, q: Tensor, k: Tensor, v: Tensor, scale: float, position: int) -> Tensor:
        # q: [B, heads, dq]; k: [B, kv, dq] post-RoPE; v: [B, kv, dv]
        cos, sin = rope_cos_sin(self.inv_freq, torch.tensor(position), k.dtype)  # [1, dk]
        k_pre = apply_rope(k, cos, -sin)  # rotate back: RoPE is orthogonal
        k_lat = torch.einsum("bkd,kdr->bkr", k_pre, self.k_basis)
        v_lat = torch.einsum("bkd,kdr->bkr", v, self.v_basis)
        self.tokens = t = self.tokens + 1
        self.k_latent, self.v_latent, self.k_rebuilt, self.v_rebuilt = (
            grow(buf, t) for buf in (self.k_latent, self.v_latent, self.k_rebuilt, self.v_rebuilt))
        self.k_latent[:, :, t - 1], self.v_latent[:, :, t - 1] = k_lat, v_lat
        self.k_rebuilt[:, :, t - 1] = apply_rope(torch.einsum("bkr,kdr->bkd", k_lat, self.k_basis), cos, sin)
        self.v_rebuilt[:, :, t - 1] = torch.einsum("bkr,kdr->bkd", v_lat, self.v_basis)
        return attend_dense(q, self.k_rebuilt[:, :, :t], self.v_rebuilt[:, :, :t], scale)[0]

    def stored_bits(self) -> float:
        tokens, kv = self.tokens, self.geom.kv_heads
        return float(tokens * kv * (self.k_latent.shape[-1] + self.v_latent.shape[-1]) * REFERENCE_BITS)
