"""The token tier (zeroc/tier.py) in the paged serving cache.

Every token's compressed K/V rows live in the cache's blocks, as for any compressed model. A
sequence's tier — the extra rows (`TierLayer`) of its first `sinks` tokens and of its last `recent`
tokens — lives in blocks it borrows from the same allocator, so the engine's block arithmetic
counts its real bytes: position p < S in tier slot p, a later one in slot S + (p - S) % W (a ring,
overwritten as tokens age out of the window). Borrowed blocks are keyed by the sequence's first
block id and return when it is freed.

The model hands the pools each layer's q, k, v with the tier's dims appended to the compressed
ones (`Attention._tiered`): q [N, heads, k_dim + tier_k], k [N, kv, k_dim + tier_k],
v [N, kv, v_dim + tier_v]. Attention is `tiered_attention`'s: per query the full-rank segment over
the sinks and its last W keys, the compressed segment over the rest, as one softmax over both
(`_attend_group`); a step's decode tokens attend at once, longer chunks one by one. Over the wire a prompt's compressed
rows travel as usual and its tier rows as `KV_TENSOR_TIER_*` chunks (prefill_service/worker.py);
the decode side lands both (`zeroc.kv_transfer.TierRows`) and calls `load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc.config import ModelConfig
from zeroc.kv_cache import PagedBatch, block_bytes
from zeroc.policies.base import KVMethod, PolicyPools, batch_sequences, ceil_div, token_bits, work_dtype
from zeroc.tier import TierLayer, tier_layers, tier_positions

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape


@dataclass(frozen=True)
class TokenTier(KVMethod):
    """The cache policy of a model with a token tier; `PagedKVCache` picks it from the model, never a flag."""

    sinks: int
    recent: int
    layers: tuple[TierLayer, ...]
    keeps_tier = True  # PagedKVCache.keeps_tier: the model's tier rows have a home
    name = "tier"  # picked from the model's weights (`tier_policy`), never by `--kv-policy`

    @property
    def label(self) -> str:
        return f"tier-s{self.sinks}-w{self.recent}"

    def check(self, shapes: list[LayerShape], block_size: int) -> None:
        widths = [(s.k_dim, s.v_dim) for s in shapes]
        if shapes and widths != [(t.k_dim, t.v_dim) for t in self.layers]:
            raise ValueError(f"tier cache: layer widths {widths} are not the model's compressed ones")

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        return block_bytes(shapes, block_size, dtype)

    def held_bits(self, shapes: list[LayerShape], tokens: int) -> float:
        """Every token's compressed rows plus the full-rank tier rows of the sinks and the recent window."""
        held = min(tokens, self.sinks + self.recent)
        tier = sum(s.kv_heads * (t.tier_k + t.tier_v) for s, t in zip(shapes, self.layers))
        return float(tokens * token_bits(shapes) + held * tier * 16)

    def borrowed_blocks(self, cfg: ModelConfig, shapes: list[LayerShape], block_size: int, tokens: int,
                        dtype: torch.dtype, step: int = 1) -> int:
        return self.tier_blocks(shapes, block_size, tokens)

    def tier_blocks(self, shapes: list[LayerShape], block_size: int, tokens: int) -> int:
        """Blocks a sequence of `tokens` tokens borrows for its tier rows: in every layer they fill the
        same block ids' slot ranges, so the widest layer decides."""
        held = min(tokens, self.sinks + self.recent)
        return max(ceil_div(held * (t.tier_k + t.tier_v), block_size * (s.k_dim + s.v_dim))
                   for s, t in zip(shapes, self.layers))

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> TierPools:
        return TierPools(self, shapes, num_blocks, block_size, dtype, device, allocator)


@dataclass(frozen=True)
class _Rows:
    """A batch's new tokens padded per sequence: row j of sequence b is token `src[b, j]` of N."""

    src: Tensor  # [B, max_q] row of N (clamped: padding repeats a real row)
    pos: Tensor  # [B, max_q] position of each padded query
    valid: Tensor  # [B, max_q] whether it is a real token
    cur: Tensor  # [B] tokens each sequence held before the step

    @classmethod
    def of(cls, batch: PagedBatch) -> _Rows:
        starts = batch.query_start_loc
        lens = starts[1:] - starts[:-1]  # [B]
        longest = int(lens.max()) if batch.max_query_len is None else batch.max_query_len
        j = torch.arange(longest, device=starts.device)[None]  # [1, max_q]
        cur = batch.seq_lens - lens
        src = (starts[:-1, None] + j).clamp(max=int(starts[-1]) - 1)
        return cls(src, cur[:, None] + j, j < lens[:, None], cur)


def _groups(batch: PagedBatch) -> list[tuple[PagedBatch, Tensor]]:
    """The batch as sub-batches attended at once, each with its rows of N: the single-token sequences
    (decode) together, every longer chunk alone (padding a decode step to a prompt's length would cost
    [B, heads, prompt, context] scores)."""
    starts = batch.query_start_loc.tolist()
    lens = [b - a for a, b in zip(starts, starts[1:])]
    if max(lens) == 1 or len(lens) == 1:
        return [(batch, torch.arange(starts[-1], device=batch.positions.device))]
    groups = [[b for b, n in enumerate(lens) if n == 1]] + [[b] for b, n in enumerate(lens) if n > 1]
    out = []
    for seqs in filter(None, groups):
        rows = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in seqs]).to(batch.positions.device)
        idx = torch.tensor(seqs, device=rows.device)
        ends = torch.tensor([0] + [lens[b] for b in seqs], device=rows.device).cumsum(0)
        out.append((PagedBatch(batch.positions[rows], batch.slot_mapping[rows], batch.block_tables[idx],
                               batch.seq_lens[idx], ends, ends[1:] - 1, max(lens[b] for b in seqs)), rows))
    return out


def tier_policy(cfg: ModelConfig) -> TokenTier:
    """The cache policy a model with a token tier needs (ValueError without one)."""
    if not cfg.has_tier:
        raise ValueError("this model keeps no token tier")
    return TokenTier(cfg.compression.sinks, cfg.compression.recent, tuple(tier_layers(cfg)))


class TierPools(PolicyPools):
    def __init__(self, policy: TokenTier, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, allocator: BlockAllocator):
        self.policy, self.shapes, self.bs, self.allocator = policy, shapes, block_size, allocator
        self.sinks, self.recent = policy.sinks, policy.recent
        # pools: [num_blocks, block_size, kv_heads, k_dim + v_dim] per layer; a borrowed block holds tier rows
        self.pools = [torch.zeros(num_blocks, block_size, s.kv_heads, s.k_dim + s.v_dim, dtype=dtype, device=device)
                      for s in shapes]
        self.borrowed: dict[int, list[int]] = {}  # a sequence's first block id -> its tier blocks
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    # -- block bookkeeping ----------------------------------------------------------------------
    def borrow_needed(self, cur: int, new: int) -> int:
        need = lambda t: self.policy.tier_blocks(self.shapes, self.bs, t)  # noqa: E731
        return need(new) - need(cur)

    def reserve(self, table: list[int], cur: int, new: int) -> None:
        ids = self.borrowed.setdefault(table[0], [])
        grow = self.policy.tier_blocks(self.shapes, self.bs, new) - len(ids)
        if grow > 0:
            ids.extend(self.allocator.allocate(grow))

    def release(self, table: list[int]) -> None:
        ids = self.borrowed.pop(table[0], None) if table else None
        if ids:
            self.allocator.free(ids)

    # -- tier rows ------------------------------------------------------------------------------
    def _slot(self, positions: Tensor) -> Tensor:
        # positions: [P] -> tier slots [P]; only positions the tier holds
        if not self.recent:
            return positions
        ring = self.sinks + (positions - self.sinks).remainder(self.recent)
        return torch.where(positions < self.sinks, positions, ring)

    def _write_tier(self, layer: int, table: list[int], positions: Tensor, rows: Tensor) -> None:
        # positions: [P] tier positions of a sequence; rows: [P, kv_heads, tier_k + tier_v]. Slot j's row is
        # elements [j * row, (j + 1) * row) of the sequence's borrowed blocks laid end to end.
        if not positions.numel():
            return
        pool = self.pools[layer]
        width = rows[0].numel()
        at = self._slot(positions)[:, None] * width + torch.arange(width, device=pool.device)  # [P, row]
        ids = torch.tensor(self.borrowed[table[0]], device=pool.device)
        per_block = pool[0].numel()
        values = rows.reshape(len(at), -1).to(pool.device, pool.dtype)  # [P, row]; rows from the wire are on the host
        pool.view(pool.shape[0], -1)[ids[at // per_block], at % per_block] = values

    def _kept(self, cur: int, new: int) -> Tensor:
        """Positions of [cur, new) the tier keeps once the sequence has `new` tokens."""
        return torch.tensor([p for r in tier_positions(self.sinks, self.recent, new) for p in r if p >= cur],
                            dtype=torch.long, device=self.pools[0].device)

    # -- the model's calls ------------------------------------------------------------------------
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        # q: [N, heads, k_dim + tier_k] -> [N, heads, v_dim + tier_v]
        k_new, v_new = self._staged.pop(layer)
        t, pool = self.policy.layers[layer], self.pools[layer]
        flat = pool.view(-1, *pool.shape[2:])  # [slots, kv_heads, k_dim + v_dim]
        flat[batch.slot_mapping] = torch.cat([k_new[..., : t.k_dim], v_new[..., : t.v_dim]], -1).to(pool.dtype)
        out = q.new_empty(q.shape[0], q.shape[1], t.v_dim + t.tier_v)
        for group, rows in _groups(batch):
            out[rows] = self._attend_group(layer, q[rows], k_new[rows], v_new[rows], group, scale)
        for cur, new, table, rows in batch_sequences(batch):  # the tier rows this step keeps
            kept = self._kept(cur, new)
            extra = torch.cat([k_new[rows, :, t.k_dim:], v_new[rows, :, t.v_dim:]], -1)
            self._write_tier(layer, table, kept, extra[kept - cur])
        return out

    def _attend_group(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, batch: PagedBatch,
                      scale: float) -> Tensor:
        """Sequences attended at once, queries padded to the longest (`_Rows`), as kernels/paged_attention.py's
        reference does. q: [n, heads, k_dim + tier_k]; k_new, v_new: [n, kv, *] -> [n, heads, v_dim + tier_v]

        One softmax over both segments instead of two merged by log-sum-exp (equal, and one fused SDPA
        call): full-rank q.k is the compressed dims' score plus the tier dims', so with the query
        [q' | q_tier], a compressed key [k' | 0] scores q'.k' and a tier key [k' | k_tier] the full score;
        each (query, position) pair is allowed in exactly one of the two key sets."""
        t, pool = self.policy.layers[layer], self.pools[layer]
        r = _Rows.of(batch)
        stored = pool[batch.block_tables].flatten(1, 2)  # [B, ctx, kv_heads, k_dim + v_dim]
        k_pos = torch.arange(stored.shape[1], device=q.device)[None, None]  # [1, 1, ctx]
        # Slots past a sequence's length hold other sequences' old rows: zeroed, as paged_attention_ref does,
        # so that nothing non-finite can leak through their 0 weights.
        stored = torch.where((k_pos[0] < batch.seq_lens[:, None])[..., None, None], stored, 0.0)
        k_c, v_c = stored[..., : t.k_dim], stored[..., t.k_dim:]
        q_pos = r.pos[..., None]  # [B, max_q, 1]
        compressed = (k_pos <= q_pos) & (k_pos < batch.seq_lens[:, None, None]) & ~self._in_tier(k_pos, q_pos)
        keys_pos, keys, values, keys_ok = self._full_keys(layer, batch, r, k_new[r.src], v_new[r.src], k_c, v_c)
        full = keys_ok[:, None] & (keys_pos[:, None] <= q_pos) & self._in_tier(keys_pos[:, None], q_pos)
        k = torch.cat([F.pad(k_c, (0, t.tier_k)), keys], 1)  # [B, ctx + K, kv, k_dim + tier_k]
        v = torch.cat([F.pad(v_c, (0, t.tier_v)), values], 1)  # [B, ctx + K, kv, v_dim + tier_v]
        mask = torch.cat([compressed, full], -1)[:, None]  # [B, 1, max_q, ctx + K]
        work = work_dtype(q.dtype)
        out = F.scaled_dot_product_attention(q[r.src].transpose(1, 2).to(work), k.transpose(1, 2).to(work),
                                             v.transpose(1, 2).to(work), attn_mask=mask, scale=scale,
                                             enable_gqa=True)  # [B, heads, max_q, v_dim + tier_v]
        return out.transpose(1, 2)[r.valid].to(q.dtype)

    def _in_tier(self, key_pos: Tensor, query_pos: Tensor) -> Tensor:
        """Whether a query sees a key at full rank: a sink, or one of its last `recent` tokens (broadcasts)."""
        return (key_pos < self.sinks) | (key_pos > query_pos - self.recent)

    def _full_keys(self, layer: int, batch: PagedBatch, r: _Rows, k_own: Tensor, v_own: Tensor, k_c: Tensor,
                   v_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Keys of the full-rank segment: each sequence's tier slots held before the step, then its own rows.

        k_own: [B, max_q, kv, k_dim + tier_k]; v_own: [B, max_q, kv, v_dim + tier_v] (padded); k_c, v_c:
        [B, ctx, kv, *] compressed rows -> positions [B, K], keys [B, K, kv, *], values [B, K, kv, v_dim + tier_v],
        valid [B, K]"""
        t, dtype = self.policy.layers[layer], k_c.dtype
        held = min(int(r.cur.max()), self.sinks + self.recent)
        tier = self._read_tiers(layer, batch, held)  # [B, held, kv, tier_k + tier_v]
        slot = torch.arange(held, device=k_c.device)[None]  # [1, held]
        cur = r.cur[:, None]  # [B, 1]
        pos = slot.expand(len(r.cur), -1)  # [B, held]: a sink's slot is its position
        if self.recent:  # a ring slot holds the latest position < cur congruent to it modulo the window
            pos = torch.where(slot < self.sinks, pos, cur - 1 - (cur - 1 - slot).remainder(self.recent))
        ok = (pos >= 0) & (pos < cur) & ((slot < self.sinks) | (pos >= self.sinks))
        at = (torch.arange(len(r.cur), device=k_c.device)[:, None], pos.clamp(min=0))
        k_tier = torch.cat([k_c[at], tier[..., : t.tier_k]], -1)  # full rank: compressed dims, then the tier's
        v_tier = torch.cat([v_c[at], tier[..., t.tier_k:]], -1)
        return (torch.cat([pos, r.pos], 1), torch.cat([k_tier, k_own.to(dtype)], 1),
                torch.cat([v_tier, v_own.to(dtype)], 1), torch.cat([ok, r.valid], 1))

    def _read_tiers(self, layer: int, batch: PagedBatch, held: int) -> Tensor:
        """The first `held` tier slots of every sequence of a batch -> [B, held, kv, tier_k + tier_v]; slots a
        sequence does not hold yet read whatever its blocks (or block 0) contain and must be masked."""
        s, t, pool = self.shapes[layer], self.policy.layers[layer], self.pools[layer]
        ids = [self.borrowed[first] for first in batch.block_tables[:, 0].tolist()]
        width = max(len(i) for i in ids)
        if not width or not held:
            return pool.new_zeros(len(ids), held, s.kv_heads, t.tier_k + t.tier_v)
        padded = torch.tensor([i + [i[-1] if i else 0] * (width - len(i)) for i in ids], device=pool.device)
        flat = pool[padded].flatten(1)[:, : held * s.kv_heads * (t.tier_k + t.tier_v)]
        return flat.view(len(ids), held, s.kv_heads, t.tier_k + t.tier_v)

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, kv, k_dim]; v: [T, kv, v_dim]: the compressed rows of tokens [0, T) from the wire
        t, pool, n = self.policy.layers[layer], self.pools[layer], k.shape[0]
        rows = pool[table[: ceil_div(n, self.bs)]].flatten(0, 1)  # [blocks * block_size, kv, k_dim + v_dim]
        rows[:n] = torch.cat([k, v], -1).to(pool.dtype)
        pool[table[: ceil_div(n, self.bs)]] = rows.view(-1, *pool.shape[1:])

    def load_tier(self, layer: int, table: list[int], positions: Tensor, k: Tensor, v: Tensor) -> None:
        """The tier rows of a prompt that arrived from a prefill service (`zeroc.kv_transfer.TierRows`), after
        `load`. positions: [P] the prompt's sinks and last `recent` positions; k: [P, kv, tier_k]; v: [P, kv, tier_v]"""
        self._write_tier(layer, table, positions.to(self.pools[layer].device), torch.cat([k, v], -1))
