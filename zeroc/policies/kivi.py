"""KIVI (Liu et al., 2024) in the paged cache: packed 2/4-bit blocks plus a full-precision tail.

A block of `group` (= block size, 32) tokens is one key group. While a block fills, and for the
`residual` tokens of full blocks after it, its K/V stay at full precision; then the block is
quantised once: keys per channel over the block's tokens, values per token over groups of
`group` channels, each with a scale and a zero point (in the cache dtype). A block id costs one
row of packed bytes per layer; a full-precision block spans `units` rows: its own plus
`units - 1` borrowed from the same allocator while it is in the tail (so the engine's block
arithmetic counts the tail's real bytes), returned once it is quantised.

Attention is token by token's: each query sees a block quantised exactly when a token-by-token
cache would have at its position, even inside a prompt prefilled in one step, so a prompt's logits
do not depend on how it was chunked (the dense oracle in tests/support/oracle checks it).
`zeroc eval ppl --streaming` runs these pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.policies.base import (REFERENCE_BITS, KVMethod, PolicyPools, ceil_div, reference_bits, token_bits,
                                 work_dtype)
from zeroc.kv_cache import layer_shapes
from zeroc.policies.layout import RowLayout, pack_codes, unpack_codes

if TYPE_CHECKING:
    from zeroc.config import ModelConfig
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch

METADATA_BITS = 2 * 16  # a 16-bit scale and zero point per group (the reference's 16 bits)


def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes of x at 2**bits levels between its min and max along `dim` -> (codes, scale, zero point).

    codes has x's shape and dtype (integers 0 .. 2**bits - 1); scale and zero point (the min) keep `dim`
    with size 1. `codes * scale + zero` is the dequantised x; the pools pack the three.
    """
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels
    codes = ((x - lo) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, levels)
    return codes, scale, lo


@dataclass(frozen=True)
class KIVI(KVMethod):
    """KIVI at `bits`, keys per channel over each block of `group` tokens, values per token over groups of
    `group` channels; the filling block and the last `residual` tokens of full blocks stay full precision."""

    bits: int = 4
    group: int = 32  # tokens per key group = the cache block size; channels per value group
    residual: int = 0  # full-precision tokens of full blocks kept besides the filling one (multiple of group)

    name = "kivi"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"KIVI bits must be 2, 4 or 8, got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"KIVI group must be a positive int, got {self.group!r}")
        if not isinstance(self.residual, int) or self.residual < 0 or self.residual % self.group:
            raise ValueError(f"KIVI residual must be a non-negative multiple of the group ({self.group}), "
                             f"got {self.residual!r}")

    @property
    def label(self) -> str:
        return f"kivi-{self.bits}-r{self.residual}"

    @property
    def fixed_block_size(self) -> int:  # type: ignore[override]
        return self.group

    def settings(self) -> dict:
        return {"kv_residual": self.residual, "block_size": self.group}

    @property
    def quantised_fraction(self) -> float:
        """The fraction of the fp16 cache a fully quantised cache holds: (bits + metadata per element) / 16."""
        return (self.bits + METADATA_BITS / self.group) / REFERENCE_BITS

    def nominal_fraction(self, head_dim: int = 64) -> float:
        return self.quantised_fraction

    def held_bits(self, shapes: list[LayerShape], tokens: int) -> float:
        done = self.quantised_blocks(tokens) * self.group  # leading tokens stored packed
        v_groups = sum(s.kv_heads * ceil_div(s.v_dim, self.group) for s in shapes)
        k_meta = sum(s.kv_heads * s.k_dim for s in shapes) * METADATA_BITS * (done // self.group)
        return float((tokens - done) * token_bits(shapes) + done * token_bits(shapes, self.bits) + k_meta
                     + done * v_groups * METADATA_BITS)

    def mean_fraction(self, cfg: ModelConfig, tokens: int) -> float:
        """The fraction of the fp16 cache held, averaged over a sequence's steps up to `tokens` tokens."""
        shapes, steps = layer_shapes(cfg), range(1, tokens) if tokens > 1 else [tokens]
        return sum(self.held_bits(shapes, t) / reference_bits(cfg, t) for t in steps) / len(steps)

    @classmethod
    def at_budget(cls, budget: float, cfg: ModelConfig, tokens: int, **fixed) -> KIVI:
        """The largest `residual` whose cache holds at most `budget` of the fp16 cache on average over a
        sequence's steps up to `tokens` tokens (the KV fraction evaluation reports)."""
        base, limit = cls(**fixed), budget + 1e-9
        if base.mean_fraction(cfg, tokens) > limit:
            raise ValueError(f"KIVI {base.bits}-bit (groups of {base.group}) costs {base.quantised_fraction:.4f} of "
                             f"the fp16 cache, more with its full-precision filling block: on average over "
                             f"{tokens} tokens, budget {budget} is below that")
        best = base
        for r in range(base.group, tokens + 1, base.group):
            wider = cls(**fixed, residual=r)
            if wider.mean_fraction(cfg, tokens) > limit:
                break
            best = wider
        return best

    def borrowed_blocks(self, cfg: ModelConfig, shapes: list[LayerShape], block_size: int, tokens: int,
                        dtype: torch.dtype, step: int = 1) -> int:
        units = max(ceil_div(self.group * s.kv_heads * (s.k_dim + s.v_dim) * dtype.itemsize,
                             self.layout(s, dtype).row_bytes) for s in shapes)
        # During a step the blocks it quantises keep their borrowed rows until the step ends (`_settle`), so
        # the old tail and the blocks the step adds are at full precision together: the residual's blocks
        # plus those `step` tokens can touch from anywhere inside a block (one, token by token).
        tail = self.residual // self.group + ceil_div(self.group - 1 + step, self.group)
        return (units - 1) * min(ceil_div(tokens, self.group), tail)

    def check(self, shapes: list[LayerShape], block_size: int) -> None:
        if block_size != self.group:
            raise ValueError(f"kivi-{self.bits} quantises keys one block at a time: the cache block size must "
                             f"equal its group ({self.group} tokens), got {block_size}")
        per = 8 // self.bits
        if any(s.k_dim % per or s.v_dim % per for s in shapes):
            raise ValueError(f"kivi-{self.bits} packs {per} codes per byte: K and V widths must be multiples of "
                             f"{per}, got {sorted({(s.k_dim, s.v_dim) for s in shapes})}")

    def quantised_blocks(self, tokens: int) -> int:
        """Leading blocks stored packed once a sequence has `tokens` tokens."""
        return max(0, tokens // self.group - self.residual // self.group)

    def layout(self, shape: LayerShape, dtype: torch.dtype) -> RowLayout:
        g, h, groups = self.group, shape.kv_heads, ceil_div(shape.v_dim, self.group)
        return RowLayout([
            ("k_codes", (g, h, shape.k_dim * self.bits // 8), torch.uint8),
            ("k_scale", (h, shape.k_dim), dtype), ("k_zero", (h, shape.k_dim), dtype),  # per channel
            ("v_codes", (g, h, shape.v_dim * self.bits // 8), torch.uint8),
            ("v_scale", (g, h, groups), dtype), ("v_zero", (g, h, groups), dtype),  # per token and group
        ])

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        return sum(self.layout(s, dtype).row_bytes for s in shapes)

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> KIVIPools:
        return KIVIPools(self, shapes, num_blocks, dtype, device, allocator)


@dataclass
class _Encoded:
    """Whole blocks quantised: what attention sees and what the pool stores."""

    k: Tensor  # [nb * group, kv_heads, k_dim] dequantised
    v: Tensor  # [nb * group, kv_heads, v_dim]
    fields: dict[str, Tensor]  # RowLayout fields, [nb, ...] each


class KIVIPools(PolicyPools):
    def __init__(self, policy: KIVI, shapes: list[LayerShape], num_blocks: int, dtype: torch.dtype,
                 device: torch.device, allocator: BlockAllocator):
        self.policy, self.shapes, self.dtype, self.allocator = policy, shapes, dtype, allocator
        self.g = policy.group
        self.layouts = [policy.layout(s, dtype) for s in shapes]
        # arena: [num_blocks, row_bytes] uint8 per layer
        self.arenas = [torch.zeros(num_blocks, lay.row_bytes, dtype=torch.uint8, device=device)
                       for lay in self.layouts]
        item = torch.empty((), dtype=dtype).element_size()
        self.tail_bytes = [self.g * s.kv_heads * (s.k_dim + s.v_dim) * item for s in shapes]
        # Rows a full-precision block spans, in every layer (block ids are shared by all layers).
        self.units = max(ceil_div(f, lay.row_bytes) for f, lay in zip(self.tail_bytes, self.layouts))
        self.borrowed: dict[int, list[int]] = {}  # tail block id -> the extra ids it spans
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    # -- block bookkeeping ----------------------------------------------------------------------
    def _tail(self, tokens: int) -> range:
        """Blocks at full precision once a sequence has `tokens` tokens."""
        return range(self.policy.quantised_blocks(tokens), ceil_div(tokens, self.g))

    def borrow_needed(self, cur: int, new: int) -> int:
        fresh = [j for j in self._tail(new) if j not in self._tail(cur)]
        return (self.units - 1) * len(fresh)

    def reserve(self, table: list[int], cur: int, new: int) -> None:
        for j in self._tail(new):
            if table[j] not in self.borrowed:
                self.borrowed[table[j]] = self.allocator.allocate(self.units - 1)

    def release(self, table: list[int]) -> None:
        for b in table:
            if b in self.borrowed:
                self.allocator.free(self.borrowed.pop(b))

    def _settle(self, table: list[int], cur: int, new: int) -> None:
        """Return what blocks quantised during a step borrowed (after the last layer used them)."""
        for j in range(self.policy.quantised_blocks(cur), self.policy.quantised_blocks(new)):
            if table[j] in self.borrowed:
                self.allocator.free(self.borrowed.pop(table[j]))

    # -- bytes <-> tensors ---------------------------------------------------------------------
    def _read_tail(self, layer: int, table: list[int], start: int, end: int) -> tuple[Tensor, Tensor]:
        """Full-precision rows of tokens [start, end) (start on a block boundary) -> k, v [end - start, H, d]."""
        s, arena = self.shapes[layer], self.arenas[layer]
        blocks = []
        for j in range(start // self.g, ceil_div(end, self.g)):
            raw = arena[[table[j], *self.borrowed[table[j]]]].reshape(-1)[: self.tail_bytes[layer]]
            blocks.append(raw.view(self.dtype).view(self.g, s.kv_heads, s.k_dim + s.v_dim))
        if not blocks:
            return (torch.empty(0, s.kv_heads, s.k_dim, dtype=self.dtype, device=arena.device),
                    torch.empty(0, s.kv_heads, s.v_dim, dtype=self.dtype, device=arena.device))
        rows = torch.cat(blocks)[: end - start]
        return rows[..., : s.k_dim], rows[..., s.k_dim:]

    def _write_tail(self, layer: int, block: int, k: Tensor, v: Tensor) -> None:
        # k: [r <= group, H, k_dim]; v: [r, H, v_dim] -> the block's own row and its borrowed ones
        arena, ids = self.arenas[layer], [block, *self.borrowed[block]]
        rows = torch.zeros(self.g, *k.shape[1:-1], k.shape[-1] + v.shape[-1], dtype=self.dtype, device=k.device)
        rows[: k.shape[0]] = torch.cat([k, v], dim=-1).to(self.dtype)
        flat = torch.zeros(len(ids) * arena.shape[1], dtype=torch.uint8, device=k.device)
        flat[: self.tail_bytes[layer]] = rows.reshape(-1).view(torch.uint8)
        arena[ids] = flat.view(len(ids), -1)

    def _read_packed(self, layer: int, blocks: list[int]) -> tuple[Tensor, Tensor]:
        """Dequantised K/V of whole packed blocks -> [len(blocks) * group, H, d] each."""
        s = self.shapes[layer]
        f = self.layouts[layer].unpack(self.arenas[layer][blocks])
        bits, dt = self.policy.bits, self.dtype
        k = unpack_codes(f["k_codes"], bits).to(dt) * f["k_scale"][:, None] + f["k_zero"][:, None]
        chan = torch.arange(s.v_dim, device=k.device) // self.policy.group  # value group of each channel
        v = unpack_codes(f["v_codes"], bits).to(dt) * f["v_scale"][..., chan] + f["v_zero"][..., chan]
        return k.reshape(-1, s.kv_heads, s.k_dim), v.reshape(-1, s.kv_heads, s.v_dim)

    def _encode(self, k: Tensor, v: Tensor) -> _Encoded:
        """Quantise whole blocks. k: [nb * group, H, k_dim]; v: [nb * group, H, v_dim]"""
        bits, g = self.policy.bits, self.g
        kb = k.reshape(-1, g, *k.shape[1:])  # [nb, group, H, k_dim]
        kc, ks, kz = quantize(kb, bits, 1)  # per channel over the block's tokens
        vb = v.reshape(-1, g, *v.shape[1:])
        parts = [quantize(c, bits, -1) for c in torch.split(vb, self.policy.group, dim=-1)]  # per token group
        vc = torch.cat([p[0] for p in parts], -1)
        vs, vz = torch.cat([p[1] for p in parts], -1), torch.cat([p[2] for p in parts], -1)
        v_deq = torch.cat([c * sc + z for c, sc, z in parts], -1)
        fields = {"k_codes": pack_codes(kc, bits), "k_scale": ks[:, 0], "k_zero": kz[:, 0],
                  "v_codes": pack_codes(vc, bits), "v_scale": vs, "v_zero": vz}
        return _Encoded((kc * ks + kz).reshape(k.shape), v_deq.reshape(v.shape), fields)

    def _store(self, layer: int, table: list[int], cur: int, new: int, enc: _Encoded, k_tail: Tensor,
               v_tail: Tensor) -> None:
        """After a step cur -> new: pack the blocks that left the tail, rewrite the tail's rows.

        k_tail/v_tail: full-precision rows from the first block not packed at `cur`; `enc` their
        leading whole blocks, encoded."""
        q_cur, q_new = self.policy.quantised_blocks(cur), self.policy.quantised_blocks(new)
        if q_new > q_cur:
            n = q_new - q_cur
            self.arenas[layer][table[q_cur:q_new]] = self.layouts[layer].pack(
                {name: t[:n] for name, t in enc.fields.items()})
        base = q_cur * self.g
        for j in self._tail(new):
            rows = slice(j * self.g - base, min((j + 1) * self.g, new) - base)
            self._write_tail(layer, table[j], k_tail[rows], v_tail[rows])

    # -- the model's calls ------------------------------------------------------------------------
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        k_new, v_new = self._staged.pop(layer)
        out = q.new_empty(q.shape[0], q.shape[1], v_new.shape[-1])
        seqs = self.sequences(batch)
        for cur, new, table, rows in seqs:
            out[rows] = self._attend_one(layer, q[rows], k_new[rows], v_new[rows], table, cur, new, scale)
        if layer == len(self.shapes) - 1:
            for cur, new, table, _ in seqs:
                self._settle(table, cur, new)
        return out

    def _attend_one(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, table: list[int], cur: int,
                    new: int, scale: float) -> Tensor:
        # q: [n, heads, k_dim]; k_new: [n, H, k_dim]; v_new: [n, H, v_dim]; n = new - cur
        g, p = self.g, self.policy
        q_cur = p.quantised_blocks(cur)
        k_old, v_old = self._read_packed(layer, table[:q_cur])
        k_prev, v_prev = self._read_tail(layer, table, q_cur * g, cur)
        k_tail, v_tail = torch.cat([k_prev, k_new.to(self.dtype)]), torch.cat([v_prev, v_new.to(self.dtype)])
        whole = (new // g - q_cur) * g  # tail rows in blocks that are full after this step
        enc = self._encode(k_tail[:whole], v_tail[:whole])
        k_full, v_full = torch.cat([k_old, k_tail]), torch.cat([v_old, v_tail])
        k_deq = torch.cat([k_old, enc.k, k_tail[whole:]])
        v_deq = torch.cat([v_old, enc.v, v_tail[whole:]])
        pos = torch.arange(cur, new, device=q.device)
        keys = torch.arange(new, device=q.device)
        # The evaluator quantises before attending: at position p, blocks < (p + 1) // g - residual / g.
        seen_quantised = ((pos + 1) // g - p.residual // g).clamp(min=0)
        use_deq = (keys // g)[None, :] < seen_quantised[:, None]  # [n, new]
        causal = keys[None, :] <= pos[:, None]
        out = mixed_attention(q, (k_full, v_full), (k_deq, v_deq), use_deq, causal, scale)
        self._store(layer, table, cur, new, enc, k_tail, v_tail)
        return out

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        whole = k.shape[0] // self.g * self.g
        k, v = k.to(self.dtype), v.to(self.dtype)
        self._store(layer, table, 0, k.shape[0], self._encode(k[:whole], v[:whole]), k, v)


def mixed_attention(q: Tensor, full: tuple[Tensor, Tensor], deq: tuple[Tensor, Tensor], use_deq: Tensor,
                    causal: Tensor, scale: float) -> Tensor:
    """GQA attention where each (query, key) pair reads the key/value either at full precision or
    dequantised. q: [n, heads, dk]; full, deq: (k [T, H, dk], v [T, H, dv]); use_deq, causal: [n, T]
    -> [n, heads, dv]. Only the causal pairs count."""
    n, heads, dk = q.shape
    kv = full[0].shape[1]
    work = work_dtype(q.dtype)
    qg = q.reshape(n, kv, heads // kv, dk).to(work)
    live = use_deq & causal
    pick = [(full, causal & ~use_deq), (deq, live)]
    pick = [(kv_pair, m) for kv_pair, m in pick if bool(m.any())]  # most steps read only one form
    scores = torch.full((kv, heads // kv, n, causal.shape[1]), float("-inf"), dtype=work, device=q.device)
    for (k, _), m in pick:
        s = torch.einsum("nhgd,thd->hgnt", qg, k.to(work)) * scale
        scores = torch.where(m, s, scores)
    probs = torch.softmax(scores, dim=-1)
    out = sum(torch.einsum("hgnt,the->nhge", probs * m, v.to(work)) for (_, v), m in pick)
    return out.reshape(n, heads, -1).to(q.dtype)
