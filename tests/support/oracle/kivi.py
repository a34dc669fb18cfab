"""KIVI-style asymmetric quantisation (Liu et al., 2024), without eviction.

Keys are quantised per channel over groups of `group` consecutive tokens (their outliers live in
fixed channels); values per token over groups of `group` channels. Every group stores a 16-bit
scale and a 16-bit zero point (min), counted in the bytes. A recent window stays at full
precision: it gets whatever the budget leaves over the quantised part, so at step t the window is
W(t) = floor(t * (budget - q) / (1 - q)) tokens, q = (bits + 32 / group) / 16 being the fraction a
quantised element costs. Key groups are quantised only once all `group` of their tokens have left
the window (KIVI's residual), so up to group - 1 extra key tokens stay at full precision; the
window shrinks further until the exact bits (codes + metadata + full-precision tokens) fit
budget * t. Only when even an empty window does not fit (the first few hundred tokens at budgets
near q, because of that key residual) does the cache exceed the budget; the evaluator reports it.

With `residual` set, the window is instead fixed, as in KIVI's paper and in the serving cache
(`zeroc.policies.kivi`): the last `residual` tokens of full groups plus the still-filling
group stay at full precision, and keys and values are quantised a whole group at a time; the
budget then plays no part (the bytes follow from bits, group and residual).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from oracle.base import (REFERENCE_BITS, KVPolicy, LayerGeometry, LayerKVCache, attend_dense,
                                 check_budget, full_bits, layer_geometry)
from zeroc.policies.eviction_rule import grow

if TYPE_CHECKING:  # annotations only: the model sits above the policies
    from zeroc.model import Transformer

METADATA_BITS = 2 * 16  # fp16 scale + fp16 zero point per group


def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes of x at 2**bits levels between its min and max along `dim` -> (codes, scale, zero point).

    codes has x's shape and dtype (integers 0 .. 2**bits - 1); scale and zero point (the min) keep `dim`
    with size 1. `codes * scale + zero` is the dequantised x; the serving cache stores the three.
    """
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels
    codes = ((x - lo) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, levels)
    return codes, scale, lo


def fake_quantize(x: Tensor, bits: int, dim: int) -> Tensor:
    """Quantise x to 2**bits levels between its min and max along `dim`, and dequantise.

    One (scale, zero point) per slice along `dim`; the error is at most scale / 2 per element.
    """
    codes, scale, lo = quantize(x, bits, dim)
    return codes * scale + lo


def quantize_values(v: Tensor, bits: int, group: int) -> Tensor:
    """Per-token quantisation of v: [..., dim], groups of `group` channels (the last may be short)."""
    return torch.cat([fake_quantize(chunk, bits, -1) for chunk in torch.split(v, group, dim=-1)], dim=-1)


def quantize_keys(k: Tensor, bits: int) -> Tensor:
    """Per-channel quantisation of one token group k: [..., group_tokens, dim] (scale per channel)."""
    return fake_quantize(k, bits, -2)


@dataclass(frozen=True)
class KIVI(KVPolicy):
    budget: float = 1.0
    bits: int = 4
    group: int = 32
    residual: int | None = None  # fixed full-precision window (a multiple of group); None: from the budget

    name = "kivi"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.bits not in (2, 4, 8):
            raise ValueError(f"KIVI bits must be 2, 4 or 8, got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"KIVI group must be a positive int, got {self.group!r}")
        if self.residual is not None:
            if not isinstance(self.residual, int) or self.residual < 0 or self.residual % self.group:
                raise ValueError(f"KIVI residual must be a non-negative multiple of the group ({self.group}), "
                                 f"got {self.residual!r}")
        elif self.budget < self.quantised_fraction - 1e-12:
            raise ValueError(f"KIVI {self.bits}-bit (groups of {self.group}) costs {self.quantised_fraction:.4f} of "
                             f"the fp16 cache even with no full-precision window; budget {self.budget} is below that")

    @property
    def quantised_fraction(self) -> float:
        """The budget a fully quantised cache reaches: (bits + metadata per element) / 16."""
        return (self.bits + METADATA_BITS / self.group) / REFERENCE_BITS

    @property
    def label(self) -> str:
        return f"kivi-{self.bits}"

    def window(self, tokens: int) -> int:
        """Full-precision recent tokens allowed when `tokens` have been seen."""
        if self.residual is not None:  # whole groups only: the residual plus the still-filling group
            return min(tokens, self.residual + tokens % self.group)
        q = self.quantised_fraction
        if self.budget >= 1.0:
            return tokens
        return min(tokens, math.floor(tokens * (self.budget - q) / (1.0 - q) + 1e-9))

    def cache_bits(self, geom: LayerGeometry, tokens: int, k_done: int, v_done: int) -> float:
        """Exact bits of one sequence's layer cache with `k_done` / `v_done` leading tokens quantised."""
        k_bits = (tokens - k_done) * geom.k_dim * REFERENCE_BITS + k_done * geom.k_dim * self.bits \
            + (k_done // self.group) * geom.k_dim * METADATA_BITS
        v_groups = math.ceil(geom.v_dim / self.group)
        v_bits = (tokens - v_done) * geom.v_dim * REFERENCE_BITS \
            + v_done * (geom.v_dim * self.bits + v_groups * METADATA_BITS)
        return float(geom.kv_heads * (k_bits + v_bits))

    def new_cache(self, model: Transformer, layer: int, batch: int) -> LayerKVCache:
        return KIVICache(self, layer_geometry(model, layer), batch, model.lm_head.weight.dtype)


class KIVICache(LayerKVCache):
    def __init__(self, policy: KIVI, geom: LayerGeometry, batch: int, dtype: torch.dtype):
        self.policy, self.geom = policy, geom
        # What attention sees (quantised tokens dequantised): [B, kv, capacity, dk] / [.., dv]; t slots live
        self.k = torch.zeros(batch, geom.kv_heads, 0, geom.k_dim, dtype=dtype)
        self.v = torch.zeros(batch, geom.kv_heads, 0, geom.v_dim, dtype=dtype)
        self.tokens = 0
        self.k_done = 0  # leading tokens whose keys are quantised (a multiple of the group)
        self.v_done = 0  # leading tokens whose values are quantised

    def step(self, q: Tensor, k: Tensor, v: Tensor, scale: float, position: int) -> Tensor:
        # q: [B, heads, dq]; k: [B, kv, dq]; v: [B, kv, dv]
        p = self.policy
        self.tokens = tokens = self.tokens + 1
        self.k, self.v = grow(self.k, tokens), grow(self.v, tokens)
        self.k[:, :, tokens - 1], self.v[:, :, tokens - 1] = k, v
        old = self._quantised_prefix(tokens)
        if old > self.v_done:
            self.v[:, :, self.v_done: old] = quantize_values(self.v[:, :, self.v_done: old], p.bits, p.group)
            self.v_done = old
        while self.k_done + p.group <= old:
            g = slice(self.k_done, self.k_done + p.group)
            self.k[:, :, g] = quantize_keys(self.k[:, :, g], p.bits)
            self.k_done += p.group
        return attend_dense(q, self.k[:, :, :tokens], self.v[:, :, :tokens], scale)[0]

    def _quantised_prefix(self, tokens: int) -> int:
        """How many leading tokens must be out of the full-precision window to fit the budget."""
        p, g = self.policy, self.geom
        old = tokens - p.window(tokens)
        if p.residual is not None:
            return old
        limit = p.budget * full_bits(g, tokens)
        while old < tokens and p.cache_bits(g, tokens, max(self.k_done, old // p.group * p.group),
                                      max(self.v_done, old)) > limit + 1e-6:
            old += 1
        return old

    def stored_bits(self) -> float:
        return self.policy.cache_bits(self.geom, self.tokens, self.k_done, self.v_done)
