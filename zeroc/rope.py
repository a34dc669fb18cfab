"""Rotary position embeddings as Hugging Face's Llama applies them (rotate_half pairs), with linear, llama3,
dynamic (NTK) and yarn frequency scaling as transformers' modeling_rope_utils defines them, and the per-KV-head pair
subsets ZeroC's fold mode keeps or drops."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.config import ModelConfig, RopeConfig
from zeroc_kernels.qkv_epilogue import apply_rope_ref

if TYPE_CHECKING:
    from zeroc_kernels.attention import AttentionBackend


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Inverse frequencies per rotary pair, with linear or llama3 scaling applied, on the CPU. [head_dim // 2]"""
    # On the CPU whatever the default device: a model skeleton built under torch.device("meta") would run
    # this arithmetic through PyTorch's Python references, whose first use imports torch._dynamo (seconds).
    pairs = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (rope.theta ** (pairs.float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, inv_freq, head_dim)
    # "dynamic" (NTK): transformers stretches theta only once a batch runs past max_position_embeddings; we serve
    # no longer sequences, and a paged cache cannot re-rotate its keys when the frequencies change.
    return inv_freq


def _yarn_inv_freq(rope: RopeConfig, inv_freq: Tensor, head_dim: int) -> Tensor:
    # inv_freq: [d/2] unscaled. Pairs that turn fewer than beta_slow times over the original context are
    # interpolated (/ factor), those turning more than beta_fast times kept, a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / rope.factor * (1 - keep) + inv_freq * keep


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeConfig) -> float:
    """What transformers multiplies cos and sin by (yarn: its attention factor; else 1). Scaling q and k each by
    it scales the logits by its square, which the model folds into the softmax scale."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def _pair_freqs(base: Tensor, pairs: tuple[tuple[int, ...], ...]) -> Tensor:
    # base: [d/2] -> [kv_heads, most pairs] frequencies of each KV head's pairs, zero past a head's own
    out = base.new_zeros(len(pairs), max(len(p) for p in pairs))
    for g, p in enumerate(pairs):
        out[g, : len(p)] = base[torch.tensor(p, dtype=torch.long, device=base.device)]
    return out


def layer_inv_freq(cfg: ModelConfig, layer: int) -> Tensor:
    """Frequencies of the RoPE pairs a layer keeps: [kv_heads, most pairs kept] (fold; zero past a KV head's
    own when its heads keep different numbers), or [1, head_dim / 2] if whole."""
    base = rope_inv_freq(cfg.rope, cfg.head_dim)
    if cfg.qk_mode(layer) != "fold":  # uncompressed and rotate mode run RoPE on every pair
        return base[None]
    return _pair_freqs(base, cfg.compression.layers[layer].qk_pairs)


def tier_inv_freq(cfg: ModelConfig, layer: int) -> Tensor:
    """Frequencies of the RoPE pairs a fold layer drops (its full-rank tier adds them back): [kv_heads, most
    pairs dropped], zero past a KV head's own."""
    base = rope_inv_freq(cfg.rope, cfg.head_dim)
    return _pair_freqs(base, cfg.compression.layers[layer].dropped_pairs(cfg.head_dim))


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for `positions` (any shape P) in HF's rotate_half layout. inv_freq: [H, r/2] -> [*P, H, r]"""
    freqs = positions.float()[..., None, None] * inv_freq.float()  # [*P, H, r/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [*P, H, r]
    return emb.cos().to(dtype), emb.sin().to(dtype)


# x: [*P, heads, d]; cos, sin: [*P, heads or 1, d] from rope_cos_sin -> RoPE(x): HF's rotate_half pairs (i, i + d/2)
apply_rope = apply_rope_ref


class RopeTables:
    """One forward's RoPE cos/sin, computed once per distinct frequency table and shared by every layer that
    uses it: the layers of an uncompressed model (and a compressed one's layers that keep the same pairs) all
    read one table, instead of each recomputing cos/sin of every position.

    `key` names a frequency table independently of the tensor holding it (each layer keeps its own buffer of
    equal values): layers whose tables are equal pass equal keys. `computed` counts the tables built.

    With `ops`, a backend whose `rope` is one kernel per tensor (`fused_rope`: triton), each q and k goes
    through it instead, cos and sin computed in registers: no tables at all. Any other backend applies the tables
    (`apply_rope`: the cpu backend's is one C++ call per tensor)."""

    def __init__(self, positions: Tensor, ops: AttentionBackend | None = None):
        self.positions = positions  # [*P]
        self.ops = ops if ops is not None and ops.fused_rope else None
        self.apply = ops.apply_rope if ops is not None else apply_rope  # the tables' use: the backend's, if any
        self._memo: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.computed = 0

    def qk(self, key: tuple, q: Tensor, k: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE on q [*P, heads, r] and k [*P, kv_heads, r]; inv_freq: [kv_heads or 1, r/2], named by `key`."""
        if self.ops is not None:
            return self.ops.rope(q, self.positions, inv_freq), self.ops.rope(k, self.positions, inv_freq)
        group = q.shape[-2] // k.shape[-2]
        memo_key = (key, q.dtype, group)
        if memo_key not in self._memo:
            cos, sin = rope_cos_sin(inv_freq, self.positions, q.dtype)  # [*P, kv_heads or 1, r]
            cos_q, sin_q = cos, sin
            if cos.shape[-2] > 1:  # per-KV-head pairs: each query head uses its group's
                cos_q, sin_q = cos.repeat_interleave(group, -2), sin.repeat_interleave(group, -2)
            self._memo[memo_key] = (cos, sin, cos_q, sin_q)
            self.computed += 1
        cos, sin, cos_q, sin_q = self._memo[memo_key]
        return self.apply(q, cos_q, sin_q), self.apply(k, cos, sin)

    def tier_qkv(self, keys: tuple[tuple, tuple], qkv: tuple[Tensor, Tensor, Tensor],
                 tier: tuple[Tensor, Tensor, Tensor], inv_freq: Tensor, tier_inv_freq: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """A fold layer's full-rank q, k, v with a token tier: qkv (q [*P, heads, r], k [*P, kv, r], v) and tier
        (the dropped pairs' q, k and the V complement), RoPE at inv_freq and tier_inv_freq (named by keys), joined
        -> q [*P, heads, d], k [*P, kv, d], v [*P, kv, d]. With `ops` one kernel (`AttentionBackend.tier_qkv`),
        where RoPE per tensor and the three joins took seven."""
        if self.ops is not None:
            return self.ops.tier_qkv(*qkv, *tier, self.positions, inv_freq, tier_inv_freq)
        (q, k, v), (q_tier, k_tier, v_tier) = qkv, tier
        q, k = self.qk(keys[0], q, k, inv_freq)
        q_tier, k_tier = self.qk(keys[1], q_tier, k_tier, tier_inv_freq)
        return torch.cat([q, q_tier], -1), torch.cat([k, k_tier], -1), torch.cat([v, v_tier], -1)


def rope_qk(q: Tensor, k: Tensor, inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q [*P, heads, r] and k [*P, kv_heads, r]; inv_freq: [kv_heads or 1, r/2]; positions: [*P]."""
    return RopeTables(positions).qk((), q, k, inv_freq)
