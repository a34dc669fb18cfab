"""The KV-method seam: one class per method, used alike by serving and by evaluation.

`PagedKVCache` (zeroc/kv_cache.py) keeps block ids, block tables and lengths for every method;
a `KVMethod` (a frozen dataclass of the method's hyperparameters) says how many token slots a
sequence holds, how many bytes a block costs and how many bits a sequence holds (its byte
maths), and builds the `PolicyPools` that owns the pools in the method's stored form (packed KIVI
codes, H2O's kept tokens). `zeroc serve` and `zeroc eval ppl --streaming` run the same pools.
Without a method the cache keeps its plain full-precision pools and this module is not involved.
docs/policies.md describes each method's block.

Byte accounting: the uncompressed reference stores every K/V element in 16 bits (the fp16
serving cache), whatever dtype the model computes in, so quantisation is not flattered by
comparing against fp32.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Hashable

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: the cache sits below, the config's model schema beside, the model above
    from zeroc.config import ModelConfig
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch
    from zeroc.model import Transformer

REFERENCE_BITS = 16  # bits per element of the uncompressed cache a budget is a fraction of


def check_budget(budget: float) -> None:
    if not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"KV budget must be in (0, 1], got {budget!r}")


def reference_bits(cfg: ModelConfig, tokens: int) -> float:
    """Bits of the uncompressed fp16 cache of every layer holding `tokens` tokens (one sequence), at the
    source model's head_dim even for a ZeroC-compressed model: the denominator of every KV fraction."""
    return float(tokens * cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * cfg.head_dim * REFERENCE_BITS)


def token_bits(shapes: list[LayerShape], bits: int = REFERENCE_BITS) -> int:
    """Bits one token's K and V rows cost over all layers at `bits` per element."""
    return sum(s.kv_heads * (s.k_dim + s.v_dim) for s in shapes) * bits


def eviction_keep(tokens: int, budget: float, floor_tokens: int) -> int:
    """Tokens a token-eviction method may keep when `tokens` have been seen.

    floor(budget * tokens) so its bytes never exceed budget * tokens, but never fewer than
    `floor_tokens` (the sinks / at least the current token) and never more than seen.
    """
    return min(tokens, max(math.floor(budget * tokens + 1e-9), floor_tokens))


class PolicyPools(abc.ABC):
    """One cache's KV in a policy's poolsd form, indexed by the cache's block ids.

    Who calls what (never concurrently: the decode service calls `load` under its engine loop's lock):
    - `prepare(model)`: `PagedKVCache.__init__` when the cache is built for a model (the engine, the
      prefill worker): fit what the pools need from the model (Palu's bases, SnapKV's head
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
    - `graph_safe`: `zeroc.decode_runner.graph_safe`: whether a decode step through these pools reads nothing
      back to the host and keeps its shapes, so that a CUDA graph may hold it (on a backend whose kernels do
      likewise). Pools that walk sequences on the host (KIVI, eviction, Palu) say no.
    """

    graph_safe: ClassVar[bool] = False

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

    # -- what every layer of a step reads alike, built once ------------------------------------------------
    def begin_step(self, batch: PagedBatch) -> None:
        """Every layer's `attend` of a step gets the same batch object: a new one starts a new step's memo."""
        if getattr(self, "_step_batch", None) is not batch:
            self._step_batch, self._memo = batch, {}

    def once(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """`build()` in the step's first layer only (after `begin_step`): what depends on the batch, not the layer
        (host reads of it, index tensors), is read or computed once, not once per layer; on a GPU each costs
        kernels, inside a CUDA graph too."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def sequences(self, batch: PagedBatch) -> list[tuple[int, int, list[int], slice]]:
        """`batch_sequences(batch)`, read from the device once per step, for pools that walk its sequences on the
        host."""
        self.begin_step(batch)
        return self.once("sequences", lambda: batch_sequences(batch))


class KVMethod(abc.ABC):
    """A KV-cache method. Subclasses are frozen dataclasses of hyperparameters whose `__post_init__`
    raises ValueError naming the bad field; `zeroc.policies.registry` names the selectable ones.

    Who calls what:
    - `check(shapes, block_size)`: `make_policy` (block size only, no shapes yet) and
      `PagedKVCache.__init__` (the model's layers): ValueError if the geometry does not suit.
    - `block_bytes(shapes, block_size, dtype)`: `PagedKVCache.__init__`, to turn a cache byte budget
      into a number of blocks (`CacheConfig.num_bytes`), and capacity reports.
    - `slots_for(tokens)`: `PagedKVCache` (blocks a sequence needs; `token_capacity`): token slots a
      sequence that has seen `tokens` tokens occupies.
    - `places_by_position`: `PagedKVCache.schedule`: whether token p lives in slot p of its table
      (else the policy's pools place tokens itself and `PagedBatch.slot_mapping` holds -1).
    - `transferable`: `zeroc serve`: whether a prompt's KV may come from a prefill service
      (the pools' `load` encodes full-precision K/V on arrival).
    - `new_pools(...)`: `PagedKVCache.__init__`, once.
    - `label`: fingerprints (KV of different policies never mixes), logs, reports.
    - `held_bits(shapes, tokens)`: evaluation's KV fraction and the conformance tests: bits of K/V one
      sequence holds after `tokens` tokens (the budget's definition: 16-bit reference, no bookkeeping).
    - `nominal_fraction(head_dim)`: the benchmark's method table: the fraction of the fp16 cache it
      aims at (its budget, or what its bits cost).
    - `settings()`: the `CacheConfig` fields that name this method (`zeroc.policies.registry.cache_config`).
    - `at_budget(budget, cfg, tokens)`: evaluation at a KV budget (`zeroc eval quality`, `eval ppl`).
    """

    name: ClassVar[str] = "policy"  # the registry's name (`--kv-policy`)
    places_by_position: ClassVar[bool] = True
    transferable: ClassVar[bool] = True
    fixed_block_size: ClassVar[int | None] = None  # a block size the method requires (KIVI's group)

    def check(self, shapes: list[LayerShape], block_size: int) -> None:
        """Any geometry suits by default."""

    @abc.abstractmethod
    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block id costs over all layers, metadata included."""

    def slots_for(self, tokens: int) -> int:
        return tokens

    @abc.abstractmethod
    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> PolicyPools:
        """Pools for `num_blocks` blocks; `allocator` is the cache's (for borrowed blocks)."""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """Short name with the hyperparameters that change the stored KV, e.g. "kivi-4-r0"."""

    @abc.abstractmethod
    def held_bits(self, shapes: list[LayerShape], tokens: int) -> float:
        """Bits of K/V one sequence holds after `tokens` tokens, over all layers, metadata included."""

    def nominal_fraction(self, head_dim: int = 64) -> float:
        """The fraction of the fp16 cache this method aims at (its budget by default)."""
        return float(getattr(self, "budget", 1.0))

    def settings(self) -> dict:
        """The `CacheConfig` fields (besides `kv_policy`) that select this method's hyperparameters."""
        return {"kv_budget": self.budget} if hasattr(self, "budget") else {}

    @classmethod
    def at_budget(cls, budget: float, cfg: ModelConfig, tokens: int, **fixed) -> KVMethod:
        """The method holding at most `budget` of the fp16 cache of `cfg` after `tokens` tokens (ValueError
        if it cannot). Methods whose budget is a hyperparameter take it as is."""
        return cls(budget=budget, **fixed)

    def borrowed_blocks(self, cfg: ModelConfig, shapes: list[LayerShape], block_size: int, tokens: int,
                        dtype: torch.dtype, step: int = 1) -> int:
        """The most blocks one sequence of up to `tokens` tokens borrows besides its token blocks, at any
        moment of a step that adds up to `step` tokens (a chunked prefill's chunk; 1 token by token)."""
        return 0

    def sequence_blocks(self, cfg: ModelConfig, shapes: list[LayerShape], block_size: int, tokens: int,
                        dtype: torch.dtype, step: int = 1) -> int:
        """Blocks to reserve for one sequence of up to `tokens` tokens fed at most `step` tokens a step
        (sizing a cache for whole sequences)."""
        return ceil_div(self.slots_for(tokens), block_size) + self.borrowed_blocks(cfg, shapes, block_size, tokens,
                                                                                  dtype, step)


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
