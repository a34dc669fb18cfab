"""The paged KV cache: per-layer pools of fixed-size blocks and a block table per sequence.

A block id indexes the same slot range in every layer's pool, so one allocation covers the
whole model. Pools may have different widths per layer (compressed models have per-layer
ranks). Callers (the engine's scheduler) use `can_fit`, `schedule` and `free`; the model
uses `layer` and the KV-write seam through the `PagedBatch` that `schedule` returns.

The KV-write seam: every way K/V enter the cache goes through one of its methods, and each tells the
cache's listeners (`listening`) which rows landed where:
- `write(layer, slots, k, v)`: rows computed by the model in PyTorch (or staged for a policy's pools);
- `wrote(layer, slots)`: rows a kernel already wrote into the pools (the Triton QKV epilogue);
- `write_rows(layer, is_key, slots, rows)`: one half of the rows, from a prefill service's transfer;
- `write_blocks(blocks, k, v)`: whole blocks from the prefix store's pool;
- `load(...)` / `load_tier(...)`: a prompt's KV computed elsewhere, into a policy's or a tier's pools.
Listeners are how a prefill service ships each layer as it is computed, on every backend and device.

With a KV policy (`CacheConfig.kv_policy`, zeroc/policies) the block ids, tables and
lengths stay here, while the policy's `PolicyPools` owns the pools in its stored form: the
model then calls `write` and `pools.attend` instead of reading `layer`. A model with a token
tier brings its own pools (zeroc/policies/tier.py) the same way.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor

from zeroc.config import CacheConfig, ModelConfig
from zeroc.config.settings import DEFAULT_CACHE_BYTES
from zeroc.device import host_to_device

if TYPE_CHECKING:  # annotations only: the model and the policies sit above this layer
    from zeroc.model import Transformer
    from zeroc.policies.base import KVMethod


# A KV-write listener: (layer, slots [N], k [N, kv_heads, k_dim] or None, v [N, kv_heads, v_dim] or None), called
# after the rows landed; one of k, v is None when only that half arrived (a transfer's chunk).
KVListener = Callable[[int, Tensor, "Tensor | None", "Tensor | None"], None]


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


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for a new cache on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":  # torch's allocator keeps freed blocks for reuse (a fused model's old
        # projections, say): free to the cache as well, though the driver counts them as taken
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line; give the cache a byte budget (num_bytes)")


def cache_budget_bytes(cfg: CacheConfig, device: torch.device) -> int:
    """The byte budget a cache with settings `cfg` fills: `num_bytes`, else `memory_fraction` of the
    memory available now, else DEFAULT_CACHE_BYTES."""
    if cfg.num_bytes:
        return cfg.num_bytes
    if cfg.memory_fraction:
        return int(cfg.memory_fraction * available_memory_bytes(device))
    return DEFAULT_CACHE_BYTES


def layer_shapes(cfg: ModelConfig) -> list[LayerShape]:
    """Cache geometry of every layer of a model (compressed layers store fewer dims, a layer with per-KV-head
    ranks one row of all its heads' dims; a token tier's extra rows are its pools', not the blocks')."""
    return [LayerShape(*cfg.kv_geometry(i)) for i in range(cfg.num_hidden_layers)]


@dataclass(frozen=True)
class PagedBatch:
    """Where one forward step's tokens live in the cache (B sequences, N new tokens)."""

    positions: Tensor  # [N] absolute position of each new token
    slot_mapping: Tensor  # [N] flat slot (block * block_size + offset) each new token's K/V goes to
    block_tables: Tensor  # [B, max_blocks] block ids of each sequence, padded with 0
    seq_lens: Tensor  # [B] context length of each sequence after this step
    query_start_loc: Tensor  # [B + 1] offsets of each sequence's new tokens in N
    last_token_indices: Tensor  # [B] row in N of each sequence's last new token
    # The most new tokens of one sequence, known on the host where the batch is built: kernels size their grid
    # by it, and reading it from query_start_loc would make the host wait for the device in every layer.
    max_query_len: int | None = None
    # Per sequence, on the host: the position of its first new token (the tokens cached before this step; 0: a
    # prompt with nothing cached), None where the builder does not say (a decode row); and its new-token count.
    # Empty where the builder said nothing.
    starts: tuple[int | None, ...] = ()
    query_lens: tuple[int, ...] = ()

    @property
    def fresh(self) -> bool:
        """Every sequence's context is its new tokens alone: backends may attend the step's own rows densely."""
        return bool(self.starts) and all(s == 0 for s in self.starts)


class PagedKVCache:
    """Block pools for every layer plus the block table and length of every live sequence."""

    def __init__(self, shapes: list[LayerShape], cfg: CacheConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", allocator: BlockAllocator | None = None,
                 model: Transformer | None = None, policy: KVMethod | None = None):
        """`policy`: how blocks store KV (zeroc/policies, a token tier's pools); None keeps the plain
        full-precision pools. `zeroc.caches.paged_cache` picks it from the settings and the model.
        `model`: the weights a policy's pools may fit itself to (Palu's bases); give it whenever the cache
        serves a model (the engine, the prefill worker)."""
        self.block_size = cfg.block_size
        self.device = torch.device(device)
        self.shapes, self.dtype, self.num_layers = shapes, dtype, len(shapes)
        if policy is None and cfg.kv_policy != "none":
            raise ValueError(f"a cache with --kv-policy {cfg.kv_policy} needs its policy object: build it with "
                             "zeroc.caches.paged_cache")
        self.policy, self.pools = policy, None
        if self.policy is not None:
            self.policy.check(shapes, cfg.block_size)
        # Bytes one block takes in this model's geometry and the policy's stored form.
        self.bytes_per_block = (self.policy.block_bytes(shapes, cfg.block_size, dtype) if self.policy
                                else block_bytes(shapes, cfg.block_size, dtype))
        self.num_blocks = cfg.num_blocks
        if not self.num_blocks:  # a byte budget: as many blocks as fit it
            budget = cache_budget_bytes(cfg, self.device)
            self.num_blocks = budget // self.bytes_per_block
            if self.num_blocks < 1:
                raise ValueError(f"a KV cache of {budget} bytes holds no block ({self.bytes_per_block} bytes each)")
        self.allocator = allocator or FreeListAllocator(self.num_blocks)
        if self.policy is not None:
            self.pools = self.policy.new_pools(shapes, self.num_blocks, cfg.block_size, dtype, self.device,
                                               self.allocator)
            if model is not None:
                self.pools.prepare(model)
        else:  # k_pool: [num_blocks, block_size, kv_heads, k_dim]; v_pool likewise with v_dim
            self.k_pools = [torch.zeros(self.num_blocks, cfg.block_size, s.kv_heads, s.k_dim, dtype=dtype,
                                        device=self.device) for s in shapes]
            self.v_pools = [torch.zeros(self.num_blocks, cfg.block_size, s.kv_heads, s.v_dim, dtype=dtype,
                                        device=self.device) for s in shapes]
        self._tables: dict[str, list[int]] = {}
        self._lens: dict[str, int] = {}
        self._listeners: list[KVListener] = []

    # -- bookkeeping, for the scheduler ---------------------------------------------------
    def _table_growth(self, seq_id: str, num_new_tokens: int) -> int:
        """Blocks `seq_id`'s table must gain to hold its token slots after `num_new_tokens` more."""
        total = self._lens.get(seq_id, 0) + num_new_tokens
        slots = total if self.policy is None else self.policy.slots_for(total)
        return max(0, -(-slots // self.block_size) - len(self._tables.get(seq_id, ())))

    def blocks_needed(self, seq_id: str, num_new_tokens: int) -> int:
        """Blocks `seq_id` would have to take to append `num_new_tokens` tokens (with a KV policy,
        also those its pools borrow, e.g. KIVI's full-precision tail)."""
        cur = self._lens.get(seq_id, 0)
        borrow = 0 if self.pools is None else self.pools.borrow_needed(cur, cur + num_new_tokens)
        return self._table_growth(seq_id, num_new_tokens) + borrow

    def token_capacity(self, limit: int) -> int:
        """The longest sequence (at most `limit` tokens) that the whole cache holds alone at every
        length up to it; a longer prompt could never be admitted."""
        if self.policy is None:
            return min(limit, self.num_blocks * self.block_size)
        for t in range(1, limit + 1):
            need = -(-self.policy.slots_for(t) // self.block_size) + self.pools.borrow_needed(0, t)
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
    def keeps_tier(self) -> bool:
        """Whether this cache holds a token tier's rows (built with a tiered model=)."""
        return getattr(self.policy, "keeps_tier", False)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def total_tokens(self) -> int:
        """Token slots of the whole cache (its blocks times their size): what a byte budget bought."""
        return self.num_blocks * self.block_size

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
            if self.pools is not None:
                self.pools.reserve(table, start, start + n)
            self._lens[seq_id] = start + n
            out.append((start, grown))
        return out

    @property
    def places_by_position(self) -> bool:
        """Whether a token's slot follows from its position (else the policy's pools places it: slot -1)."""
        return self.policy is None or self.policy.places_by_position

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat slots of positions [start, end) of `seq_id` (-1 each where the policy's pools place tokens)."""
        if not self.places_by_position:
            return [-1] * (end - start)
        table, bs = self._tables[seq_id], self.block_size
        return [table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def schedule(self, steps: list[tuple[str, int]]) -> PagedBatch:
        """Reserve slots for `(seq_id, num_new_tokens)` pairs and describe them as a PagedBatch.

        All-or-nothing: if the blocks do not fit, raises CacheFullError and changes nothing.
        """
        positions, slots, lens, starts, tables = [], [], [], [0], []
        reserved = self.append_slots(steps)
        for (seq_id, n), (start, _) in zip(steps, reserved):
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
            max_query_len=max(n for _, n in steps),
            starts=tuple(start for start, _ in reserved),
            query_lens=tuple(n for _, n in steps),
        )

    def truncate(self, seq_id: str, length: int) -> None:
        """Forget `seq_id`'s slots from `length` on (what was written there, a draft's rows the model did not keep,
        is overwritten later), freeing the blocks left empty. Plain pools only: a policy's stored form (quantized
        groups, a token tier) cannot take rows back."""
        if self.policy is not None:
            raise ValueError(f"a cache storing KV as {self.policy.label} cannot take back rows")
        if not 0 <= length <= self._lens.get(seq_id, 0):
            raise ValueError(f"{seq_id!r}: cannot cut {self._lens.get(seq_id, 0)} slots to {length}")
        table, keep = self._tables[seq_id], -(-length // self.block_size)
        dropped = table[keep:]
        del table[keep:]
        self._lens[seq_id] = length
        if dropped:
            self.allocator.free(dropped)

    def free(self, seq_id: str) -> None:
        """Release every block of `seq_id` (finished, cancelled or preempted). Idempotent."""
        blocks = self._tables.pop(seq_id, None)
        self._lens.pop(seq_id, None)
        if blocks:
            if self.pools is not None:
                self.pools.release(blocks)
            self.allocator.free(blocks)

    # -- data, for the model -----------------------------------------------------------------
    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """The (k_pool, v_pool) of one layer: [num_blocks, block_size, kv_heads, dim] each."""
        if self.pools is not None:
            raise RuntimeError(f"this cache stores KV as {self.policy.label}; read it through its store")
        return self.k_pools[layer], self.v_pools[layer]

    # -- the KV-write seam ------------------------------------------------------------------------
    @contextlib.contextmanager
    def listening(self, listener: KVListener) -> Iterator[None]:
        """Call `listener` for every row written while the block runs (the prefill service's shipping)."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def _notify(self, layer: int, slots: Tensor, k: Tensor | None, v: Tensor | None) -> None:
        for listener in self._listeners:
            listener(layer, slots, k, v)

    def write(self, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
        """The model's new rows. slot_mapping: [N]; k: [N, kv_heads, k_dim]; v: [N, kv_heads, v_dim]"""
        if self.pools is not None:  # the pools encode them in its attend, right after this
            self.pools.stage(layer, k, v)
        else:
            k_pool, v_pool = self.k_pools[layer], self.v_pools[layer]
            k_pool.view(-1, *k_pool.shape[2:])[slot_mapping] = k.to(k_pool.dtype)
            v_pool.view(-1, *v_pool.shape[2:])[slot_mapping] = v.to(v_pool.dtype)
        self._notify(layer, slot_mapping, k, v)

    def wrote(self, layer: int, slot_mapping: Tensor) -> None:
        """A kernel wrote rows into `slot_mapping` [N] of a plain cache itself: tell the listeners, who get
        the rows read back from the pools (only when someone listens)."""
        if self._listeners:
            k_pool, v_pool = self.layer(layer)
            self._notify(layer, slot_mapping, k_pool.view(-1, *k_pool.shape[2:])[slot_mapping],
                         v_pool.view(-1, *v_pool.shape[2:])[slot_mapping])

    def write_rows(self, layer: int, is_key: bool, slots: Tensor, rows: Tensor) -> None:
        """One half of a prompt's rows computed elsewhere (a transfer chunk), into a plain cache's slots.
        slots: [n]; rows: [n, kv_heads, dim]. ValueError if the rows do not fit the pool."""
        pool = self.layer(layer)[0 if is_key else 1]
        if tuple(rows.shape[1:]) != tuple(pool.shape[2:]):
            raise ValueError(f"rows are {tuple(rows.shape[1:])}; this cache stores {tuple(pool.shape[2:])}")
        flat = pool.view(-1, *pool.shape[2:])  # [blocks * block_size, kv_heads, width]
        if pool.device.type == "cpu" and rows.dtype == pool.dtype and rows.device.type == "cpu":
            # numpy scatters whole rows with memcpy; torch's index_put goes element by element, which made
            # this copy cost more than the transfer itself (docs/benchmarks.md, KV transfer).
            _byte_rows(flat)[slots.numpy()] = _byte_rows(rows)
        else:
            flat[slots] = rows.to(pool.device, pool.dtype)
        self._notify(layer, slots, rows if is_key else None, None if is_key else rows)

    def write_blocks(self, blocks: list[int], k: list[Tensor], v: list[Tensor]) -> None:
        """Whole blocks (the prefix store's): per layer k[layer]: [len(blocks), block_size, kv_heads, k_dim],
        v likewise, into the cache's `blocks`."""
        dst = torch.tensor(blocks, dtype=torch.long, device=self.device)
        slots = (dst[:, None] * self.block_size + torch.arange(self.block_size, device=self.device)).flatten()
        for layer in range(self.num_layers):
            k_pool, v_pool = self.layer(layer)
            k_pool[dst] = k[layer].to(self.device, k_pool.dtype)
            v_pool[dst] = v[layer].to(self.device, v_pool.dtype)
            if self._listeners:
                self._notify(layer, slots, k_pool[dst].flatten(0, 1), v_pool[dst].flatten(0, 1))

    def read_blocks(self, blocks: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Copies of whole blocks: per layer [len(blocks), block_size, kv_heads, dim] (for the prefix store)."""
        src = torch.tensor(blocks, dtype=torch.long, device=self.device)
        pools = [self.layer(i) for i in range(self.num_layers)]
        return [k[src] for k, _ in pools], [v[src] for _, v in pools]

    def load(self, seq_id: str, layer: int, k: Tensor, v: Tensor) -> None:
        """KV of the first tokens of `seq_id`, computed elsewhere (a prefill service), into a policy's
        pools; the slots must be reserved by `schedule`. k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim]"""
        if self.pools is None:
            raise RuntimeError("a plain cache takes transferred KV through its slots (write_rows)")
        self.pools.load(layer, self._tables[seq_id], k, v)
        if self._listeners:
            self._notify(layer, torch.arange(k.shape[0], device=self.device), k, v)

    def load_tier(self, seq_id: str, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """A token tier's rows of `seq_id` (positions: [P]; k: [P, kv_heads, tier_k]; v likewise) into its
        tier pools."""
        self.pools.load_tier(layer, self._tables[seq_id], positions, k, v)
        self._notify(layer, positions, k, v)


def _byte_rows(t: Tensor):
    # t: [n, ...] contiguous -> numpy uint8 [n, bytes per row] over the same memory
    return t.view(torch.uint8).reshape(t.shape[0], -1).numpy()
