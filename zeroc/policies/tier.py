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
the sinks and its last W keys, the compressed segment over the rest.
- A decode step (`_attend_decode`) hands the compressed segment, keys [S, length - W), to the backend's paged
  decode kernel (`AttentionBackend.decode_partials`, which starts at key S and returns its LSEs unmerged),
  attends the S + W tier slots and the token itself at full rank, and merges the two by LSE: it reads the
  compressed cache once, at its width, as a plain decode step does.
- A step with a longer chunk attends its decode tokens together and each chunk alone. A chunk whose first
  position the host knows (`PagedBatch.starts`: every prompt chunk the engine or the prefill worker schedules)
  goes to `_attend_chunk`: `tiered_chunk_attention` runs its compressed segment as one or two plain attention
  calls in the backend's flash kernel (`dense_partials`) and its full-rank one as local attention, over its own
  rows and the cached rows it needs read in position order. Otherwise (`_attend_group`) one masked SDPA call
  takes one softmax over both segments.
Neither reads the device back to the host: every shape comes from the batch's host fields (`max_query_len`,
`query_lens`) or is the tier's fixed S + W, and the device keeps its own copy of each sequence's borrowed
block ids (`tier_ids`). So a decode step of a tiered model syncs once, for its sampled ids, and a CUDA
graph can hold it (zeroc/decode_runner.py). Over the wire a prompt's compressed
rows travel as usual and its tier rows as `KV_TENSOR_TIER_*` chunks (prefill_service/worker.py);
the decode side lands both (`zeroc.kv_transfer.TierRows`) and calls `load`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc_kernels.attention import AttentionBackend, TorchBackend
from zeroc_kernels.tier_decode import TierSlots
from zeroc.config import ModelConfig
from zeroc.device import host_to_device
from zeroc.kv_cache import PagedBatch, block_bytes
from zeroc.policies.base import KVMethod, PolicyPools, ceil_div, token_bits, work_dtype
from zeroc.tier import CachedRows, TierLayer, tier_layers, tiered_chunk_attention

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape
    from zeroc.model import Transformer


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
    def of(cls, batch: PagedBatch, n: int) -> _Rows:
        """`n`: the batch's new tokens (N, a shape the host knows)."""
        starts = batch.query_start_loc
        lens = starts[1:] - starts[:-1]  # [B]
        longest = int(lens.max()) if batch.max_query_len is None else batch.max_query_len
        j = torch.arange(longest, device=starts.device)[None]  # [1, max_q]
        cur = batch.seq_lens - lens
        src = (starts[:-1, None] + j).clamp(max=n - 1)
        return cls(src, cur[:, None] + j, j < lens[:, None], cur)


@dataclass(frozen=True)
class _Slots:
    """Where a batch's full-rank keys are, the same in every layer: each sequence's S + W tier slots, then its
    own new rows (K = S + W + max_q keys)."""

    rows: _Rows
    held: Tensor  # [B, S + W] whether the slot holds a position yet
    blocks: Tensor  # [B, S + W] cache block of that position's compressed row (position 0's where none)
    offsets: Tensor  # [B, S + W] its slot in the block
    tier_ids: Tensor  # [B, most tier blocks] the sequence's borrowed blocks, padded with the trash block
    keys_pos: Tensor  # [B, K] each key's position
    keys_ok: Tensor  # [B, K] whether it is a key at all


@dataclass(frozen=True)
class _Writes:
    """The new rows a step hands the tier, the same in every layer: rows of N [P], each row's sequence's
    borrowed blocks [P, most tier blocks], its tier slot [P] (0 where dropped), whether the tier keeps it [P]."""

    rows: Tensor
    ids: Tensor
    slot: Tensor
    kept: Tensor


def _groups(batch: PagedBatch, n: int) -> list[tuple[PagedBatch, Tensor]]:
    """The batch as sub-batches attended at once, each with its rows of N: the single-token sequences
    (decode) together, every longer chunk alone (padding a decode step to a prompt's length would cost
    [B, heads, prompt, context] scores). The split comes from the host's query lengths, never the device's."""
    device = batch.positions.device
    if batch.max_query_len == 1:
        return [(batch, torch.arange(n, device=device))]
    lens = list(batch.query_lens) or [b - a for a, b in itertools.pairwise(batch.query_start_loc.tolist())]
    if len(lens) == 1:
        return [(batch, torch.arange(n, device=device))]
    starts = [0, *itertools.accumulate(lens)]
    groups = [[b for b, m in enumerate(lens) if m == 1]] + [[b] for b, m in enumerate(lens) if m > 1]
    out = []
    for seqs in filter(None, groups):
        rows = host_to_device([i for b in seqs for i in range(starts[b], starts[b + 1])], torch.long, device)
        idx = host_to_device(seqs, torch.long, device)
        ends = host_to_device([0, *itertools.accumulate(lens[b] for b in seqs)], torch.long, device)
        out.append((PagedBatch(batch.positions[rows], batch.slot_mapping[rows], batch.block_tables[idx],
                               batch.seq_lens[idx], ends, ends[1:] - 1, max(lens[b] for b in seqs),
                               starts=tuple(batch.starts[b] for b in seqs) if batch.starts else (),
                               query_lens=tuple(lens[b] for b in seqs)), rows))
    return out


def _tier_candidates(batch: PagedBatch, n: int, sinks: int, recent: int) -> tuple[Tensor, Tensor]:
    """The new tokens the tier may keep -> (their rows of N [P], their sequences [P]), on the device: every row
    of a decode step; of a chunk, its first S and last W rows (repeated where the chunk is shorter), since
    only those can be sinks or among its sequence's last W tokens. A prompt's other rows are never written."""
    device = batch.positions.device
    if batch.max_query_len == 1:
        rows = torch.arange(n, device=device)
        return rows, rows
    starts, ends = batch.query_start_loc[:-1, None], batch.query_start_loc[1:, None]  # [B, 1]
    j = torch.arange(sinks + recent, device=device)[None]  # [1, S + W]
    rows = torch.where(j < sinks, starts + j, ends - (sinks + recent) + j)
    rows = torch.minimum(torch.maximum(rows, starts), ends - 1)  # [B, S + W]
    seqs = torch.arange(rows.shape[0], device=device)[:, None].expand_as(rows)
    return rows.flatten(), seqs.flatten()


def tier_policy(cfg: ModelConfig) -> TokenTier:
    """The cache policy a model with a token tier needs (ValueError without one)."""
    if not cfg.has_tier:
        raise ValueError("this model keeps no token tier")
    return TokenTier(cfg.compression.sinks, cfg.compression.recent, tuple(tier_layers(cfg)))


class TierPools(PolicyPools):
    graph_safe = True  # `_attend_decode`: fixed shapes, the tier's block ids on the device

    def __init__(self, policy: TokenTier, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, allocator: BlockAllocator):
        self.policy, self.shapes, self.bs, self.allocator = policy, shapes, block_size, allocator
        self.sinks, self.recent = policy.sinks, policy.recent
        # pools: [num_blocks + 1, block_size, kv_heads, k_dim + v_dim] per layer; a borrowed block holds tier
        # rows. Block num_blocks is never allocated: the rows of a step that the tier does not keep land there,
        # so every new row is written without the host choosing which (that would read the device).
        self.trash = num_blocks
        self.pools = [torch.zeros(num_blocks + 1, block_size, s.kv_heads, s.k_dim + s.v_dim, dtype=dtype,
                                  device=device) for s in shapes]
        self.borrowed: dict[int, list[int]] = {}  # a sequence's first block id -> its tier blocks
        # The device's copy of `borrowed`: [num_blocks + 1, most tier blocks] (padded with the trash block), so a
        # step finds every sequence's tier rows from its block table alone.
        width = max(1, policy.tier_blocks(shapes, block_size, self.sinks + self.recent))
        self.tier_ids = torch.full((num_blocks + 1, width), self.trash, dtype=torch.long, device=device)
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}
        self.backend: AttentionBackend = TorchBackend()  # the model's, once `prepare` has seen it

    def prepare(self, model: Transformer) -> None:
        # Decode steps run the compressed segment through the model's backend (its paged decode kernel).
        self.backend = model.backend

    # -- block bookkeeping ----------------------------------------------------------------------
    def borrow_needed(self, cur: int, new: int) -> int:
        need = lambda t: self.policy.tier_blocks(self.shapes, self.bs, t)  # noqa: E731
        return need(new) - need(cur)

    def reserve(self, table: list[int], cur: int, new: int) -> None:
        ids = self.borrowed.setdefault(table[0], [])
        grow = self.policy.tier_blocks(self.shapes, self.bs, new) - len(ids)
        if grow > 0:
            ids.extend(self.allocator.allocate(grow))
            with torch.inference_mode():  # the scheduler's thread may not be in it, the tensor may be of it
                self.tier_ids[table[0], : len(ids)] = host_to_device(ids, torch.long, self.tier_ids.device)

    def release(self, table: list[int]) -> None:
        ids = self.borrowed.pop(table[0], None) if table else None
        if ids:
            with torch.inference_mode():
                self.tier_ids[table[0]] = self.trash
            self.allocator.free(ids)

    # -- tier rows ------------------------------------------------------------------------------
    def _slot(self, positions: Tensor) -> Tensor:
        # positions: [P] -> tier slots [P]; only positions the tier holds
        if not self.recent:
            return positions
        ring = self.sinks + (positions - self.sinks).remainder(self.recent)
        return torch.where(positions < self.sinks, positions, ring)

    def _write_tier(self, layer: int, targets: tuple[Tensor, Tensor], rows: Tensor) -> None:
        """Tier rows into their sequences' borrowed blocks at `targets` (`_tier_targets`); rows: [P, kv_heads,
        tier_k + tier_v], on the host if they came from the wire."""
        pool = self.pools[layer]
        pool.view(pool.shape[0], -1)[targets] = rows.reshape(rows.shape[0], -1).to(pool.device, pool.dtype)

    def _tier_targets(self, layer: int, ids: Tensor, slot: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Where tier rows go: slot j's row is elements [j * row, (j + 1) * row) of the sequence's borrowed blocks
        laid end to end; rows the tier drops go to the trash block. ids: [P, most tier blocks] each row's
        sequence's; slot, kept: [P] -> (block [P, row], element in it [P, row])"""
        t, pool = self.policy.layers[layer], self.pools[layer]
        width, per_block = pool.shape[2] * (t.tier_k + t.tier_v), pool[0].numel()
        at = slot[:, None] * width + torch.arange(width, device=slot.device)  # [P, row]
        return torch.where(kept[:, None], ids.gather(1, at // per_block), self.trash), at % per_block

    def _writes(self, batch: PagedBatch, n: int) -> _Writes:
        """The tier keeps a new token while it is a sink or among its sequence's last W."""
        rows, seq = _tier_candidates(batch, n, self.sinks, self.recent)  # [P] each
        pos = batch.positions[rows]
        kept = (pos < self.sinks) | (pos >= batch.seq_lens[seq] - self.recent)
        slot = torch.where(kept, self._slot(pos), 0)  # a row the tier drops may lie past its slots
        return _Writes(rows, self.tier_ids[batch.block_tables[seq, 0]], slot, kept)

    # -- the model's calls ------------------------------------------------------------------------
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        # q: [N, heads, k_dim + tier_k] -> [N, heads, v_dim + tier_v]
        k_new, v_new = self._staged.pop(layer)
        t, pool, n = self.policy.layers[layer], self.pools[layer], q.shape[0]
        flat = pool.view(-1, *pool.shape[2:])  # [slots, kv_heads, k_dim + v_dim]
        flat[batch.slot_mapping] = torch.cat([k_new[..., : t.k_dim], v_new[..., : t.v_dim]], -1).to(pool.dtype)
        self.begin_step(batch)  # the step's index tensors (`once`): built by its first layer, read by every layer
        if batch.max_query_len == 1:
            out = self._attend_decode(layer, q, k_new, v_new, batch, scale)
        else:
            out = q.new_empty(n, q.shape[1], t.v_dim + t.tier_v)
            for group, rows in self.once("groups", lambda: _groups(batch, n)):
                one = len(group.starts) == 1 and group.starts[0] is not None  # a chunk the host can place
                attend = self._attend_chunk if one else self._attend_group
                out[rows] = attend(layer, q[rows], k_new[rows], v_new[rows], group, scale)
        # Written after the attention: a chunk's later rows take ring slots its earlier queries still read.
        w = self.once("writes", lambda: self._writes(batch, n))
        rows = slice(None) if batch.max_query_len == 1 else w.rows  # a decode step's candidates: every row, in order
        extra = torch.cat([k_new[rows, :, t.k_dim:], v_new[rows, :, t.v_dim:]], -1)  # [P, kv, tier_k + tier_v]
        # the targets depend on the layer's geometry only: layers of one geometry share them
        t_key = ("targets", self.pools[layer].shape[1:], t.tier_k + t.tier_v)
        self._write_tier(layer, self.once(t_key, lambda: self._tier_targets(layer, w.ids, w.slot, w.kept)), extra)
        return out

    def _attend_decode(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, batch: PagedBatch,
                       scale: float) -> Tensor:
        """One new token per sequence. q: [B, heads, k_dim + tier_k]; k_new, v_new: [B, kv, *] -> [B, heads,
        v_dim + tier_v]. The compressed segment, keys [S, length - W), goes to the backend's paged decode
        kernel unmerged (split or not); the full-rank one is the tier's S + W slots and the token itself; one
        merge by LSE, both in the backend's `tier_decode` (one kernel on triton). Every shape is fixed by the
        batch's, so a CUDA graph can hold the step."""
        t, pool = self.policy.layers[layer], self.pools[layer]
        ends, slots = self.once("decode", lambda: self._decode_slots(batch, q.shape[0]))
        parts, lses = self.backend.decode_partials(q[..., : t.k_dim], pool[..., : t.k_dim], pool[..., t.k_dim:],
                                                   batch.block_tables, ends, scale, self.sinks)  # [B, heads, P, *]
        return self.backend.tier_decode(q, pool, t.k_dim, slots, k_new, v_new, parts, lses, scale)

    def _decode_slots(self, batch: PagedBatch, n: int) -> tuple[Tensor, TierSlots]:
        """A decode step's segments: where each compressed one ends [B] (with a recent window the token's own
        key is past it, in the tier), and where the full-rank keys are, with the ones each query sees."""
        s = self._slots(batch, _Rows.of(batch, n))  # one row each
        seen = s.keys_ok & (s.keys_pos <= s.rows.pos) & self._in_tier(s.keys_pos, s.rows.pos)  # [B, S + W + 1]
        return (batch.seq_lens - self.recent).clamp(min=self.sinks), TierSlots(s.blocks, s.offsets, s.tier_ids, seen)

    def _attend_chunk(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, batch: PagedBatch,
                      scale: float) -> Tensor:
        """One sequence's chunk whose first position the host knows (`PagedBatch.starts`): `tiered_chunk_attention`
        over its own rows and the cached rows it needs in position order (`_cached_rows`; none for a prompt with
        nothing cached), no [chunk, context] mask. q: [m, heads, k_dim + tier_k]; k_new, v_new: [m, kv, *]
        -> [m, heads, v_dim + tier_v]. On an H100 the masked path below prefilled a tier model at 11,750 tok/s
        against the plain one's 88,800 (docs/benchmarks.md)."""
        start = batch.starts[0]
        cached = self._cached_rows(layer, batch, start) if start else None
        return tiered_chunk_attention(q, k_new, v_new, self.policy.layers[layer], self.sinks, self.recent, scale,
                                      self.backend.dense_partials, cached)

    def _cached_rows(self, layer: int, batch: PagedBatch, start: int) -> CachedRows:
        """What a chunk at position `start` reads of its one sequence's cache: the compressed rows of positions
        [S, start) from its blocks, and the full-rank rows of its cached sinks and of the ring's positions
        [max(S, start - W), start) (compressed dims from its blocks, tier dims from the blocks it borrowed)."""
        t, pool = self.policy.layers[layer], self.pools[layer]
        comp_at, held_at, slots, n_sinks = self.once(("chunk", id(batch)), lambda: self._chunk_index(batch, start))
        comp = pool[comp_at]  # [start - S, kv, k_dim + v_dim]
        key = ("chunk targets", id(batch), pool.shape[1:], t.tier_k + t.tier_v)  # per geometry, as in `attend`
        where = self.once(key, lambda: self._tier_targets(  # the sequence's borrowed blocks [P, most], all kept
            layer, self.tier_ids[batch.block_tables[:1, 0]].expand(len(slots), -1), slots,
            torch.ones_like(slots, dtype=torch.bool)))
        tier = pool.view(pool.shape[0], -1)[where].view(len(slots), pool.shape[2], -1)  # [P, kv, tier_k + tier_v]
        held = pool[held_at]  # [P, kv, k_dim + v_dim]: the sinks', then the ring's compressed dims
        k_full = torch.cat([held[..., : t.k_dim], tier[..., : t.tier_k]], -1)
        v_full = torch.cat([held[..., t.k_dim:], tier[..., t.tier_k:]], -1)
        return CachedRows(start, comp[..., : t.k_dim], comp[..., t.k_dim:], k_full[:n_sinks], v_full[:n_sinks],
                          k_full[n_sinks:], v_full[n_sinks:])

    def _chunk_index(self, batch: PagedBatch, start: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor],
                                                                   Tensor, int]:
        """-> ((block, offset) of positions [S, start)), ((block, offset) of the held positions: the sinks, then the
        ring's in position order), their tier slots [P], how many sinks: the same in every layer."""
        device, bs, table = batch.block_tables.device, self.bs, batch.block_tables[0]
        sinks, after = min(self.sinks, start), max(self.sinks, start)  # a chunk may start among the sinks
        held = torch.cat([torch.arange(sinks, device=device),
                          torch.arange(max(self.sinks, start - self.recent), after, device=device)])  # [P]
        comp = torch.arange(self.sinks, after, device=device)  # [start - S], empty where start <= S
        return ((table[comp // bs], comp % bs), (table[held // bs], held % bs), self._slot(held), sinks)

    def _attend_group(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, batch: PagedBatch,
                      scale: float) -> Tensor:
        """Sequences attended at once, queries padded to the longest (`_Rows`), as kernels/paged_attention.py's
        reference does. q: [n, heads, k_dim + tier_k]; k_new, v_new: [n, kv, *] -> [n, heads, v_dim + tier_v]

        One softmax over both segments instead of two merged by log-sum-exp (equal, and one fused SDPA
        call, which a prompt's chunk needs: two explicit softmaxes over [B, heads, chunk, context] scores took
        4x as long for a 1,600-token prompt): full-rank q.k is the compressed dims' score plus the tier dims',
        so with the query [q' | q_tier], a compressed key [k' | 0] scores q'.k' and a tier key [k' | k_tier]
        the full score; each (query, position) pair is allowed in exactly one of the two key sets."""
        t, pool = self.policy.layers[layer], self.pools[layer]
        # per group (`_groups` keeps them alive through the step, so their ids name them)
        s = self.once(("slots", id(batch)), lambda: self._slots(batch, _Rows.of(batch, q.shape[0])))
        live, mask = self.once(("masks", id(batch)), lambda: self._group_masks(batch, s))
        r = s.rows
        stored = pool[batch.block_tables].flatten(1, 2)  # [B, ctx, kv_heads, k_dim + v_dim]
        # Slots past a sequence's length hold other sequences' old rows: zeroed, as paged_attention_ref does,
        # so that nothing non-finite can leak through their 0 weights.
        stored = torch.where(live[..., None, None], stored, 0.0)
        k_c, v_c = stored[..., : t.k_dim], stored[..., t.k_dim:]
        keys, values = self._full_keys(layer, s, k_new[r.src], v_new[r.src])
        k = torch.cat([F.pad(k_c, (0, t.tier_k)), keys], 1)  # [B, ctx + K, kv, k_dim + tier_k]
        v = torch.cat([F.pad(v_c, (0, t.tier_v)), values], 1)  # [B, ctx + K, kv, v_dim + tier_v]
        work = work_dtype(q.dtype)
        out = F.scaled_dot_product_attention(q[r.src].transpose(1, 2).to(work), k.transpose(1, 2).to(work),
                                             v.transpose(1, 2).to(work), attn_mask=mask, scale=scale,
                                             enable_gqa=True)  # [B, heads, max_q, v_dim + tier_v]
        return out.transpose(1, 2)[r.valid].to(q.dtype)

    def _in_tier(self, key_pos: Tensor, query_pos: Tensor) -> Tensor:
        """Whether a query sees a key at full rank: a sink, or one of its last `recent` tokens (broadcasts)."""
        return (key_pos < self.sinks) | (key_pos > query_pos - self.recent)

    def _group_masks(self, batch: PagedBatch, s: _Slots) -> tuple[Tensor, Tensor]:
        """-> (live [B, ctx]: the slots each sequence holds; mask [B, 1, max_q, ctx + K]: the compressed keys
        each query sees, then its full-rank ones)."""
        q_pos = s.rows.pos[..., None]  # [B, max_q, 1]
        k_pos = torch.arange(batch.block_tables.shape[1] * self.bs, device=q_pos.device)[None, None]  # [1, 1, ctx]
        live = k_pos[0] < batch.seq_lens[:, None]
        compressed = (k_pos <= q_pos) & live[:, None] & ~self._in_tier(k_pos, q_pos)
        full = s.keys_ok[:, None] & (s.keys_pos[:, None] <= q_pos) & self._in_tier(s.keys_pos[:, None], q_pos)
        return live, torch.cat([compressed, full], -1)[:, None]

    def _slots(self, batch: PagedBatch, r: _Rows) -> _Slots:
        held = self.sinks + self.recent  # every slot, whatever each sequence holds yet (masked by `ok`)
        slot = torch.arange(held, device=r.cur.device)[None]  # [1, held]
        cur = r.cur[:, None]  # [B, 1]
        pos = slot.expand(len(r.cur), -1)  # [B, held]: a sink's slot is its position
        if self.recent:  # a ring slot holds the latest position < cur congruent to it modulo the window
            pos = torch.where(slot < self.sinks, pos, cur - 1 - (cur - 1 - slot).remainder(self.recent))
        ok = (pos >= 0) & (pos < cur) & ((slot < self.sinks) | (pos >= self.sinks))
        at = torch.where(ok, pos, 0)  # a slot not held reads position 0's row (zeroed)
        return _Slots(r, ok, batch.block_tables.gather(1, at // self.bs), at % self.bs,
                      self.tier_ids[batch.block_tables[:, 0]], torch.cat([pos, r.pos], 1), torch.cat([ok, r.valid], 1))

    def _full_keys(self, layer: int, s: _Slots, k_own: Tensor, v_own: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the full-rank segment: each sequence's tier slots, then its own rows.
        k_own: [B, max_q, kv, k_dim + tier_k]; v_own: [B, max_q, kv, v_dim + tier_v] (padded)
        -> keys [B, K, kv, k_dim + tier_k], values [B, K, kv, v_dim + tier_v]"""
        t, shape, pool = self.policy.layers[layer], self.shapes[layer], self.pools[layer]
        b, held, width = s.held.shape[0], s.held.shape[1], t.tier_k + t.tier_v
        # the first S + W tier slots of every sequence; slots not held yet read whatever is there
        tier = pool[s.tier_ids].flatten(1)[:, : held * shape.kv_heads * width].view(b, held, shape.kv_heads, width)
        compressed = pool[s.blocks, s.offsets]  # [B, held, kv, k_dim + v_dim]
        # A slot not held yet may hold anything (a freed sequence's rows, the trash block's): zeroed, since a
        # masked score or weight does not stop a NaN. Keys: compressed dims, then the tier's.
        held_rows = s.held[..., None, None]
        k_tier = torch.where(held_rows, torch.cat([compressed[..., : t.k_dim], tier[..., : t.tier_k]], -1), 0.0)
        v_tier = torch.where(held_rows, torch.cat([compressed[..., t.k_dim:], tier[..., t.tier_k:]], -1), 0.0)
        return torch.cat([k_tier, k_own.to(pool.dtype)], 1), torch.cat([v_tier, v_own.to(pool.dtype)], 1)

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, kv, k_dim]; v: [T, kv, v_dim]: the compressed rows of tokens [0, T) from the wire
        pool, n = self.pools[layer], k.shape[0]
        rows = pool[table[: ceil_div(n, self.bs)]].flatten(0, 1)  # [blocks * block_size, kv, k_dim + v_dim]
        rows[:n] = torch.cat([k, v], -1).to(pool.dtype)
        pool[table[: ceil_div(n, self.bs)]] = rows.view(-1, *pool.shape[1:])

    def load_tier(self, layer: int, table: list[int], positions: Tensor, k: Tensor, v: Tensor) -> None:
        """The tier rows of a prompt that arrived from a prefill service (`zeroc.kv_transfer.TierRows`), after
        `load`. positions: [P] the prompt's sinks and last `recent` positions; k: [P, kv, tier_k]; v: [P, kv, tier_v]"""
        positions = positions.to(self.pools[layer].device)
        ids = self.tier_ids[table[0]].expand(len(positions), -1)
        kept = torch.ones_like(positions, dtype=torch.bool)
        self._write_tier(layer, self._tier_targets(layer, ids, self._slot(positions), kept), torch.cat([k, v], -1))
