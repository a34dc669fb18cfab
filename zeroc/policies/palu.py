"""Palu-style low-rank KV (Chang et al., 2024) in the paged cache: a latent of pre-RoPE K and of V.

A block stores, per layer, token and KV head, the latents U_k^T k_pre (rank r_k) and U_v^T v
(rank r_v), with r = floor(budget * head_dim): bases fitted from the weights alone (an SVD of each
head's W_k / W_v, no whitening, no calibration text; Palu folds U_r into W_o, the numbers are the
same), once, when the cache is built for its model (`PolicyPools.prepare`). Attention rebuilds
every stored key from its latent and applies RoPE at the token's position, every step (the
per-token work ZeroC's fold mode avoids), then attends causally in fp32.

Why the pools inverse-rotate the staged keys instead of taking pre-RoPE ones: the model hands
every cache post-RoPE keys through one seam (`PagedKVCache.write`), and RoPE is a rotation, so
rotating back by the token's position recovers k_pre exactly (up to rounding) without a second
path through the model; the dense oracle (tests/support/oracle) does the same. A token's position is its slot (tokens are placed by position), so nothing else is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.rope import apply_rope, rope_cos_sin
from zeroc.policies.base import REFERENCE_BITS, KVMethod, PolicyPools, ceil_div, check_budget
from zeroc.policies.kivi import mixed_attention

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch
    from zeroc.model import Transformer


def weight_basis(weight: Tensor, heads: int, rank: int) -> Tensor:
    """Top-`rank` left singular vectors of each head's block of a projection.

    weight: [heads * d, hidden] -> [heads, d, rank] orthonormal columns
    """
    blocks = weight.detach().double().view(heads, -1, weight.shape[-1])  # [heads, d, hidden]
    u, _, _ = torch.linalg.svd(blocks, full_matrices=False)  # u: [heads, d, d]
    return u[:, :, :rank].to(weight.dtype)


@dataclass(frozen=True)
class Palu(KVMethod):
    """Low-rank K (pre-RoPE) and V latents at rank floor(budget * head_dim) (`--kv-budget`)."""

    budget: float = 1.0

    name = "palu"

    def __post_init__(self) -> None:
        check_budget(self.budget)

    def rank(self, head_dim: int) -> int:
        return max(1, math.floor(self.budget * head_dim + 1e-9))

    @property
    def label(self) -> str:
        return f"palu-b{self.budget:g}"

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return block_size * item * sum(s.kv_heads * (self.rank(s.k_dim) + self.rank(s.v_dim)) for s in shapes)

    def held_bits(self, shapes: list[LayerShape], tokens: int) -> float:
        return float(tokens * REFERENCE_BITS * sum(s.kv_heads * (self.rank(s.k_dim) + self.rank(s.v_dim))
                                                   for s in shapes))

    def bases(self, model: Transformer, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """One layer's (k_basis [kv, dk, r_k], v_basis [kv, dv, r_v], inv_freq [1, dk / 2]) from its weights;
        ValueError for a compressed model (the baseline applies to the uncompressed one)."""
        if model.config.compression is not None:
            raise ValueError("the Palu baseline applies to an uncompressed model; this one is already compressed")
        attn = model.model.layers[layer].self_attn
        kv, k_dim, v_dim = model.config.kv_geometry(layer)
        # plain_weight: a served model may hold them only in packs (Transformer.release_plain_weights)
        return (weight_basis(model.plain_weight(attn.k_proj), kv, self.rank(k_dim)),
                weight_basis(model.plain_weight(attn.v_proj), kv, self.rank(v_dim)), attn.inv_freq)

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> PaluPools:
        return PaluPools(self, shapes, num_blocks, block_size, dtype, device)


class PaluPools(PolicyPools):
    def __init__(self, policy: Palu, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.policy, self.shapes, self.bs, self.dtype = policy, shapes, block_size, dtype
        rank = policy.rank
        # Per layer: k_lat [num_blocks, block_size, kv_heads, r_k], v_lat [.., r_v]
        self.k_lat = [torch.zeros(num_blocks, block_size, s.kv_heads, rank(s.k_dim), dtype=dtype, device=device)
                      for s in shapes]
        self.v_lat = [torch.zeros(num_blocks, block_size, s.kv_heads, rank(s.v_dim), dtype=dtype, device=device)
                      for s in shapes]
        self.bases: list[tuple[Tensor, Tensor, Tensor]] = []  # per layer: k_basis, v_basis, inv_freq
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    def prepare(self, model: Transformer) -> None:
        device = self.k_lat[0].device
        self.bases = []
        for layer in range(len(self.shapes)):
            k_basis, v_basis, inv_freq = self.policy.bases(model, layer)  # ValueError if compressed
            self.bases.append((k_basis.to(device, self.dtype), v_basis.to(device, self.dtype), inv_freq.to(device)))

    def _encode(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # positions: [N]; k: [N, kv, dk] post-RoPE; v: [N, kv, dv] -> latents [N, kv, r_k], [N, kv, r_v]
        if not self.bases:
            raise RuntimeError("a palu cache needs its model's bases: build PagedKVCache(..., model=...)")
        k_basis, v_basis, inv_freq = self.bases[layer]
        cos, sin = rope_cos_sin(inv_freq, positions, self.dtype)  # [N, 1, dk]
        k_pre = apply_rope(k.to(self.dtype), cos, -sin)  # rotate back: RoPE is orthogonal
        return (torch.einsum("nkd,kdr->nkr", k_pre, k_basis),
                torch.einsum("nkd,kdr->nkr", v.to(self.dtype), v_basis))

    def _slots(self, table: list[int], n: int) -> Tensor:
        j = torch.arange(n, device=self.k_lat[0].device)
        blocks = torch.tensor(table[: ceil_div(n, self.bs)], dtype=torch.long, device=j.device)
        return blocks[j // self.bs] * self.bs + j % self.bs

    def _write(self, layer: int, slots: Tensor, k_lat: Tensor, v_lat: Tensor) -> None:
        for pool, lat in ((self.k_lat[layer], k_lat), (self.v_lat[layer], v_lat)):
            pool.view(-1, *pool.shape[2:])[slots] = lat

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        k_new, v_new = self._staged.pop(layer)
        self._write(layer, batch.slot_mapping, *self._encode(layer, batch.positions, k_new, v_new))
        k_basis, v_basis, inv_freq = self.bases[layer]
        out = q.new_empty(q.shape[0], q.shape[1], v_new.shape[-1])
        for cur, new, table, rows in self.sequences(batch):
            slots = self._slots(table, new)
            k_lat = self.k_lat[layer].view(-1, *self.k_lat[layer].shape[2:])[slots]  # [new, kv, r_k]
            v_lat = self.v_lat[layer].view(-1, *self.v_lat[layer].shape[2:])[slots]  # [new, kv, r_v]
            keys = torch.arange(new, device=q.device)
            cos, sin = rope_cos_sin(inv_freq, keys, self.dtype)
            k = apply_rope(torch.einsum("nkr,kdr->nkd", k_lat, k_basis), cos, sin)  # rebuilt every step
            v = torch.einsum("nkr,kdr->nkd", v_lat, v_basis)
            causal = keys[None, :] <= torch.arange(cur, new, device=q.device)[:, None]  # [n, new]
            # One form only: every pair reads the rebuilt K/V (KIVI's helper with nothing dequantised).
            out[rows] = mixed_attention(q[rows], (k, v), (k, v), torch.zeros_like(causal), causal, scale)
        return out

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, kv, dk] post-RoPE keys of tokens [0, T); v: [T, kv, dv]
        positions = torch.arange(k.shape[0], device=k.device)
        self._write(layer, self._slots(table, k.shape[0]), *self._encode(layer, positions, k, v))
