"""int8 per-token quantisation of the KV cache, stackable on any model (ZeroC-compressed included).

Each (token, KV head) row of K and of V is stored as int8 codes with one fp32 scale
max|x| / 127, rounded half away from zero: the numerics of `kernels/kv_quant.py`, which the
serving kernels use, so a row costs width * 8 + 32 bits. Every token is quantised as it is
stored (there is no full-precision window) and attention reads every token dequantised,
the new one included, as the int8 paged cache does (write, then read).

Bytes follow from the bits and the model's actual K/V widths: on a ZeroC model of rank
fraction r the cache holds about r / 2 + 64 / (32 * head_dim) of the uncompressed fp16 cache.
`budget` is a ceiling: `prepare` refuses a model whose int8 cache would exceed it, and
`max_width_fraction` says which ZeroC rank fraction fits a budget (the quality harness's
`zeroc-int8` rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc_kernels.kv_quant import dequantize_rows_ref as dequantize_rows
from zeroc_kernels.kv_quant import quantize_rows_ref as quantize_rows
from oracle.base import (KVPolicy, LayerGeometry, LayerKVCache, attend_dense, check_budget, layer_geometry,
                         reference_bits)
from zeroc.policies.eviction_rule import grow

if TYPE_CHECKING:  # annotations only: the model sits above the policies
    from zeroc.model import Transformer

CODE_BITS = 8
SCALE_BITS = 32  # one fp32 scale per (token, KV head) row, as kernels/kv_quant.py stores it


def fake_quantize_rows(x: Tensor) -> Tensor:
    """x quantised per row and dequantised back to its dtype. x: [..., d]"""
    return dequantize_rows(*quantize_rows(x), x.dtype)


def row_bits(geom: LayerGeometry) -> int:
    """Bits one token costs in one layer: K and V rows of every KV head, codes and scales."""
    return geom.kv_heads * ((geom.k_dim + geom.v_dim) * CODE_BITS + 2 * SCALE_BITS)


@dataclass(frozen=True)
class Int8(KVPolicy):
    budget: float = 1.0  # ceiling on the held fraction of the uncompressed fp16 cache (checked by `prepare`)

    name = "int8"

    def __post_init__(self) -> None:
        check_budget(self.budget)

    def fraction(self, model: Transformer) -> float:
        """Bits this cache holds per token / the uncompressed fp16 cache's (of the model's source widths)."""
        layers = range(model.config.num_hidden_layers)
        return sum(row_bits(layer_geometry(model, i)) for i in layers) / reference_bits(model, 1)

    def max_width_fraction(self, model: Transformer) -> float:
        """The largest fraction of the source K/V widths (ZeroC's rank budget) whose int8 cache, scales
        included, fits `budget`; above 1.0 the full widths fit. Only layer count, KV heads and head_dim
        of `model` matter, so the uncompressed model answers for its compressed versions."""
        cfg = model.config
        rows = cfg.num_hidden_layers * cfg.num_key_value_heads
        return (self.budget * reference_bits(model, 1) - rows * 2 * SCALE_BITS) / (rows * 2 * cfg.head_dim * CODE_BITS)

    def prepare(self, model: Transformer) -> None:
        held = self.fraction(model)
        if held > self.budget + 1e-9:
            raise ValueError(f"int8 holds {held:.4f} of the fp16 cache on this model (K/V widths "
                             f"{'/'.join(map(str, model.config.kv_geometry(0)[1:]))} in layer 0); budget {self.budget} "
                             "is below that")

    def new_cache(self, model: Transformer, layer: int, batch: int) -> LayerKVCache:
        return Int8Cache(layer_geometry(model, layer), batch, model.lm_head.weight.dtype)


class Int8Cache(LayerKVCache):
    def __init__(self, geom: LayerGeometry, batch: int, dtype: torch.dtype):
        self.geom = geom
        # Dequantised rows, what attention sees: [B, kv, capacity, dk] / [.., dv]; `tokens` slots live
        self.k = torch.zeros(batch, geom.kv_heads, 0, geom.k_dim, dtype=dtype)
        self.v = torch.zeros(batch, geom.kv_heads, 0, geom.v_dim, dtype=dtype)
        self.tokens = 0

    def step(self, q: Tensor, k: Tensor, v: Tensor, scale: float, position: int) -> Tensor:
        # q: [B, heads, dq]; k: [B, kv, dq]; v: [B, kv, dv]
        self.tokens = t = self.tokens + 1
        self.k, self.v = grow(self.k, t), grow(self.v, t)
        self.k[:, :, t - 1], self.v[:, :, t - 1] = fake_quantize_rows(k), fake_quantize_rows(v)
        return attend_dense(q, self.k[:, :, :t], self.v[:, :, :t], scale)[0]

    def stored_bits(self) -> float:
        return float(self.tokens * row_bits(self.geom))
