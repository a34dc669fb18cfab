"""The paged KV cache: per-layer pools of fixed-size blocks and a block table per sequence.

A block id indexes the same slot range in every layer's pool, so one allocation covers the
whole model. Pools may have different widths per layer (compressed models have per-layer
ranks). Callers (the engine's scheduler) use `can_fit`, `schedule` and `free`; the model
uses `layer` and `write` through the `PagedBatch` that `schedule` returns.

With a KV policy (`CacheConfig.kv_policy`, zeroc/serving_policies) the block ids, tables and
lengths stay here, while the policy's `PolicyStore` owns the pools in its stored form: the
model then calls `write` and `store.attend` instead of reading `layer`. A model with a token
tier brings its own store (zeroc/tier_store.py) the same way.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.config import CacheConfig, ModelConfig
from zeroc.device import host_to_device

if TYPE_CHECKING:  # the model imports this module
    from zeroc.model import Transformer


class CacheFullError(RuntimeError):
    """Raised when a sequence needs more blocks than are free; the caller should wait or preempt."""


class BlockAllocator(abc.ABC):
    """Hands out block ids of the cache's pools. Called by `PagedKVCache` only."""

    @abc.abstractmethod
    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks; raise CacheFullError (taking none) if fewer are free."""

    @abc.abstractmethod
    def free(self, blocks: list[int]) -> None:
        """Return blocks taken by `allocate`."""

    @property
    @abc.abstractmethod
    def num_free(self) -> int:
        """Blocks available to `allocate` now."""


class FreeListAllocator(BlockAllocator):
    """A LIFO free list: recently freed blocks are reused first (warm in cache)."""

    def __init__(self, num_blocks: int):
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"need {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)

    @property
    def num_free(self) -> int:
        return len(self._free)


@dataclass(frozen=True)
class LayerShape:
    """Per-layer cache geometry: KV heads and the K and V widths stored per head."""

    kv_heads: int
    k_dim: int
    v_dim: int


def block_bytes(shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block of the plain cache over all layers: K and V of `block_size` tokens."""
    item = torch.empty((), dtype=dtype).element_size()
    return block_size * item * sum(s.kv_heads * (s.k_dim + s.v_dim) for s in shapes)


def layer_shapes(cfg: ModelConfig) -> list[LayerShape]:
    """Cache geometry of every layer of a model (compressed layers store fewer dims, a layer with per-KV-head
    ranks one row of all its heads' dims; a token tier's extra rows are its store's, not the blocks')."""
    return [LayerShape(*cfg.kv_geometry(i)) for i in range(cfg.num_hidden_layers)]


def sequence_blocks(cfg: ModelConfig, block_size: int, tokens: int) -> int:
    """Blocks one sequence of `tokens` tokens holds in a model's plain cache, a token tier's borrowed ones
    included (zeroc/tier_store.py): what sizing a cache for whole sequences needs."""
    blocks = -(-tokens // block_size)
    if cfg.has_tier:
        from zeroc.tier_store import tier_policy  # here: it imports this module

        blocks += tier_policy(cfg).tier_blocks(layer_shapes(cfg), block_size, tokens)
    return blocks


@dataclass(frozen=True)
class PagedBatch:
    """Where one forward step's tokens live in the cache (B sequences, N new tokens)."""

    positions: Tensor  # [N] absolute position of each new token
    slot_mapping: Tensor  # [N] flat slot (block * block_size + offset) each new token's K/V goes to
    block_tables: Tensor  # [B, max_blocks] block ids of each sequence, padded with 0
    seq_lens: Tensor  # [B] context length of each sequence after this step
    query_start_loc: Tensor  # [B + 1] offsets of each sequence's new tokens in N
    last_token_indices: Tensor  # [B] row in N of each sequence's last new token


class PagedKVCache:
    """Block pools for every layer plus the block table and length of every live sequence."""

    def __init__(self, shapes: list[LayerShape], cfg: CacheConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", allocator: BlockAllocator | None = None,
                 model: Transformer | None = None):
        """`model`: the weights a policy's store may fit itself to (Palu's bases) and whose token tier,
        if it keeps one, the cache must hold; give it whenever the cache serves a model (the engine,
        the prefill worker)."""
        self.block_size = cfg.block_size
        self.device = torch.device(device)
        self.shapes, self.dtype, self.num_layers = shapes, dtype, len(shapes)
        # -- KV policy (zeroc/serving_policies): None keeps the plain full-precision pools --------
        self.policy, self.store = None, None
        if cfg.kv_policy != "none":
            from zeroc.serving_policies import make_serving_policy  # here: it imports the model, which imports us

            self.policy = make_serving_policy(cfg)
        if model is not None and model.config.has_tier:
            if self.policy is not None:
                raise ValueError(f"--kv-policy {cfg.kv_policy} does not combine with a model that keeps a token "
                                 "tier (it brings its own cache form); serve it with --kv-policy none")
            from zeroc.tier_store import tier_policy  # here, as make_serving_policy

            self.policy = tier_policy(model.config)
        if self.policy is not None:
            self.policy.check(shapes, cfg.block_size)
        self.num_blocks = cfg.num_blocks
        if cfg.num_bytes:  # a byte budget: as many blocks as the policy's block size allows
            per_block = (self.policy.block_bytes(shapes, cfg.block_size, dtype) if self.policy
                         else block_bytes(shapes, cfg.block_size, dtype))
            self.num_blocks = cfg.num_bytes // per_block
            if self.num_blocks < 1:
                raise ValueError(f"a KV cache of {cfg.num_bytes} bytes holds no block ({per_block} bytes each)")
        self.allocator = allocator or FreeListAllocator(self.num_blocks)
        if self.policy is not None:
            self.store = self.policy.new_store(shapes, self.num_blocks, cfg.block_size, dtype, self.device,
                                               self.allocator)
            if model is not None:
                self.store.prepare(model)
        else:  # k_pool: [num_blocks, block_size, kv_heads, k_dim]; v_pool likewise with v_dim
            self.k_pools = [torch.zeros(self.num_blocks, cfg.block_size, s.kv_heads, s.k_dim, dtype=dtype,
                                        device=self.device) for s in shapes]
            self.v_pools = [torch.zeros(self.num_blocks, cfg.block_size, s.kv_heads, s.v_dim, dtype=dtype,
                                        device=self.device) for s in shapes]
        self._tables: dict[str, list[int]] = {}
        self._lens: dict[str, int] = {}

    # -- bookkeeping, for the scheduler ---------------------------------------------------
    def _table_growth(self, seq_id: str, num_new_tokens: int) -> int:
        """Blocks `seq_id`'s table must gain to hold its token slots after `num_new_tokens` more."""
        total = self._lens.get(seq_id, 0) + num_new_tokens
        slots = total if self.policy is None else self.policy.slots_for(total)
        return max(0, -(-slots // self.block_size) - len(self._tables.get(seq_id, ())))

    def blocks_needed(self, seq_id: str, num_new_tokens: int) -> int:
        """Blocks `seq_id` would have to take to append `num_new_tokens` tokens (with a KV policy,
        also those its store borrows, e.g. KIVI's full-precision tail)."""
        cur = self._lens.get(seq_id, 0)
        borrow = 0 if self.store is None else self.store.borrow_needed(cur, cur + num_new_tokens)
        return self._table_growth(seq_id, num_new_tokens) + borrow

    def token_capacity(self, limit: int) -> int:
        """The longest sequence (at most `limit` tokens) that the whole cache holds alone at every
        length up to it; a longer prompt could never be admitted."""
        if self.policy is None:
            return min(limit, self.num_blocks * self.block_size)
        for t in range(1, limit + 1):
            need = -(-self.policy.slots_for(t) // self.block_size) + self.store.borrow_needed(0, t)
            if need > self.num_blocks:
                return t - 1
        return limit

    def can_fit(self, seq_id: str, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_new_tokens) <= self.allocator.num_free

    def seq_len(self, seq_id: str) -> int:
        return self._lens.get(seq_id, 0)

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._tables.get(seq_id, ()))

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def live_sequences(self) -> int:
        return len(self._tables)

    def append_slots(self, steps: list[tuple[str, int]]) -> list[tuple[int, list[int]]]:
        """Reserve slots for `(seq_id, num_new_tokens)` pairs without describing them as tensors: per pair,
        (its length before, the block ids its table gained). The engine's persistent batch applies these
        to its device copy of the tables; `schedule` describes them from scratch.

        All-or-nothing: if the blocks do not fit, raises CacheFullError and changes nothing.
        """
        need = sum(self.blocks_needed(s, n) for s, n in steps)
        if need > self.allocator.num_free:
            raise CacheFullError(f"step needs {need} KV blocks, {self.allocator.num_free} free")
        out = []
        for seq_id, n in steps:
            if n <= 0:
                raise ValueError(f"sequence {seq_id!r} scheduled with {n} tokens")
            start = self._lens.get(seq_id, 0)
            grown = self.allocator.allocate(self._table_growth(seq_id, n))
            table = self._tables.setdefault(seq_id, [])
            table.extend(grown)
            if self.store is not None:
                self.store.reserve(table, start, start + n)
            self._lens[seq_id] = start + n
            out.append((start, grown))
        return out

    @property
    def places_by_position(self) -> bool:
        """Whether a token's slot follows from its position (else the policy's store places it: slot -1)."""
        return self.policy is None or self.policy.places_by_position

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat slots of positions [start, end) of `seq_id` (-1 each where the store places tokens)."""
        if not self.places_by_position:
            return [-1] * (end - start)
        table, bs = self._tables[seq_id], self.block_size
        return [table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def schedule(self, steps: list[tuple[str, int]]) -> PagedBatch:
        """Reserve slots for `(seq_id, num_new_tokens)` pairs and describe them as a PagedBatch.

        All-or-nothing: if the blocks do not fit, raises CacheFullError and changes nothing.
        """
        positions, slots, lens, starts, tables = [], [], [], [0], []
        for (seq_id, n), (start, _) in zip(steps, self.append_slots(steps)):
            positions.extend(range(start, start + n))
            slots.extend(self.slots(seq_id, start, start + n))
            lens.append(start + n)
            starts.append(starts[-1] + n)
            tables.append(self._tables[seq_id])
        width = max(len(t) for t in tables)
        block_tables = [t + [0] * (width - len(t)) for t in tables]
        as_long = lambda xs: host_to_device(xs, torch.long, self.device)  # noqa: E731 (no device sync)
        return PagedBatch(
            positions=as_long(positions),
            slot_mapping=as_long(slots),
            block_tables=as_long(block_tables),
            seq_lens=as_long(lens),
            query_start_loc=as_long(starts),
            last_token_indices=as_long([s - 1 for s in starts[1:]]),
        )

    def free(self, seq_id: str) -> None:
        """Release every block of `seq_id` (finished, cancelled or preempted). Idempotent."""
        blocks = self._tables.pop(seq_id, None)
        self._lens.pop(seq_id, None)
        if blocks:
            if self.store is not None:
                self.store.release(blocks)
            self.allocator.free(blocks)

    # -- data, for the model -----------------------------------------------------------------
    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """The (k_pool, v_pool) of one layer: [num_blocks, block_size, kv_heads, dim] each."""
        if self.store is not None:
            raise RuntimeError(f"this cache stores KV as {self.policy.label}; read it through its store")
        return self.k_pools[layer], self.v_pools[layer]

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        # slot_mapping: [N]; k: [N, kv_heads, k_dim]; v: [N, kv_heads, v_dim]
        if self.store is not None:  # the store encodes them in its attend, right after this
            self.store.stage(layer, k, v)
            return
        k_pool, v_pool = self.k_pools[layer], self.v_pools[layer]
        k_pool.view(-1, *k_pool.shape[2:])[slot_mapping] = k.to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[slot_mapping] = v.to(v_pool.dtype)

    def load(self, seq_id: str, layer: int, k: Tensor, v: Tensor) -> None:
        """KV of the first tokens of `seq_id`, computed elsewhere (a prefill service), into a policy's
        store; the slots must be reserved by `schedule`. k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim]"""
        if self.store is None:
            raise RuntimeError("a plain cache takes transferred KV through its slots (KvReceiver)")
        self.store.load(layer, self._tables[seq_id], k, v)
