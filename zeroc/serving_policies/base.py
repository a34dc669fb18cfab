"""The serving-cache policy seam: how a paged KV cache stores, reads and counts a policy's KV.

`PagedKVCache` (zeroc/kv_cache.py) keeps block ids, block tables and lengths for every policy;
a `ServingKVPolicy` says how many token slots a sequence holds and how many bytes a block costs,
and builds the `PolicyStore` that owns the pools in the policy's stored form (packed KIVI codes,
H2O's kept tokens). Without a policy the cache keeps its plain full-precision pools and this
module is not involved. docs/policies.md ("In serving") describes each policy's block.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # kv_cache imports this package lazily; only annotations need these names
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch
    from zeroc.model import Transformer


class PolicyStore(abc.ABC):
    """One cache's KV in a policy's stored form, indexed by the cache's block ids.

    Who calls what (never concurrently: the decode service calls `load` under its engine loop's lock):
    - `prepare(model)`: `PagedKVCache.__init__` when the cache is built for a model (the engine, the
      prefill worker): fit what the store needs from the model (Palu's bases, SnapKV's head
      counts); ValueError if the model does not suit.
    - `borrow_needed(cur, new)`: `PagedKVCache.blocks_needed`: blocks a sequence must borrow,
      beyond its token blocks, to grow from `cur` to `new` tokens (KIVI's full-precision tail).
    - `reserve(table, cur, new)`: `PagedKVCache.schedule`, after extending `table` to cover `new`
      tokens: take the borrowed blocks counted by `borrow_needed` (never more).
    - `stage(layer, k, v)`: `PagedKVCache.write`, i.e. the model's forward once per layer and step,
      right before `attend`: the step's new rows at full precision (encoding happens in `attend`).
    - `attend(layer, q, batch, scale)`: `Transformer.forward_paged`, once per layer and step: attend
      each new query over what is stored (decoded on read) plus the staged rows, then store the
      staged rows in the policy's form (encode on write).
    - `load(layer, table, k, v)`: `PagedKVCache.load`, when a prompt's KV computed elsewhere (a
      prefill service) arrives for a sequence reserved by `schedule`; touches only that
      sequence's blocks. Policies whose state cannot be rebuilt from K/V raise NotImplementedError.
    - `release(table)`: `PagedKVCache.free`, before the table's blocks return to the allocator.
    """

    def prepare(self, model: Transformer) -> None:
        """Nothing to fit by default."""

    def borrow_needed(self, cur: int, new: int) -> int:
        return 0

    def reserve(self, table: list[int], cur: int, new: int) -> None:
        """Nothing to borrow by default."""

    @abc.abstractmethod
    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k: [N, kv_heads, k_dim]; v: [N, kv_heads, v_dim], the rows of the batch's new tokens."""

    @abc.abstractmethod
    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        """q: [N, heads, k_dim] -> [N, heads, v_dim]."""

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim] of tokens [0, T)
        raise NotImplementedError(f"{type(self).__name__} cannot take KV computed elsewhere")

    def release(self, table: list[int]) -> None:
        """Nothing borrowed by default."""


class ServingKVPolicy(abc.ABC):
    """A KV policy for the paged serving cache. Subclasses are frozen dataclasses of hyperparameters
    whose `__post_init__` raises ValueError on bad values.

    Who calls what:
    - `check(shapes, block_size)`: `make_serving_policy` (block size only, no shapes yet) and
      `PagedKVCache.__init__` (the model's layers): ValueError if the geometry does not suit.
    - `block_bytes(shapes, block_size, dtype)`: `PagedKVCache.__init__`, to turn a cache byte budget
      into a number of blocks (`CacheConfig.num_bytes`), and capacity reports.
    - `slots_for(tokens)`: `PagedKVCache` (blocks a sequence needs; `token_capacity`): token slots a
      sequence that has seen `tokens` tokens occupies.
    - `places_by_position`: `PagedKVCache.schedule`: whether token p lives in slot p of its table
      (else the store places tokens itself and `PagedBatch.slot_mapping` holds -1).
    - `transferable`: `zeroc serve`: whether a prompt's KV may come from a prefill service
      (the store's `load` encodes full-precision K/V on arrival).
    - `new_store(...)`: `PagedKVCache.__init__`, once.
    - `label`: fingerprints (KV of different policies never mixes), logs, reports.
    """

    places_by_position: bool = True
    transferable: bool = True

    def check(self, shapes: list[LayerShape], block_size: int) -> None:
        """Any geometry suits by default."""

    @abc.abstractmethod
    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block id costs over all layers, metadata included."""

    def slots_for(self, tokens: int) -> int:
        return tokens

    @abc.abstractmethod
    def new_store(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> PolicyStore:
        """Pools for `num_blocks` blocks; `allocator` is the cache's (for borrowed blocks)."""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """Short name with the hyperparameters that change the stored KV, e.g. "kivi-4-r0"."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def batch_sequences(batch: PagedBatch) -> list[tuple[int, int, list[int], slice]]:
    """Per sequence of a batch: (tokens before the step, after it, block table, its rows of N).

    Tables are padded with 0 to the batch's widest; callers cut them to the blocks they use."""
    lens = batch.seq_lens.tolist()
    starts = batch.query_start_loc.tolist()
    tables = batch.block_tables.tolist()
    return [(new - (starts[b + 1] - starts[b]), new, tables[b], slice(starts[b], starts[b + 1]))
            for b, new in enumerate(lens)]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and sums in fp32 at least, as the model's SDPA and the streaming evaluator do."""
    return torch.promote_types(dtype, torch.float32)
