"""int8 in the paged cache: every token's K/V rows as int8 codes with one fp32 scale each.

Each (token, KV head) row of K and V is quantised as it is written (max|x| / 127, rounded half away
from zero: `kernels/kv_quant.py`'s numerics) and attention reads every row dequantised, the step's
own included (there is no full-precision window). It is stackable on any model: on a
ZeroC-compressed one it quantises the compressed rows (the pools hold the model's actual K/V
widths), so a row costs width * 8 + 32 bits and a ZeroC model of rank fraction r holds about
r / 2 + 64 / (32 * head_dim) of the uncompressed fp16 cache.

The pools are exactly what the paged attention kernels read (`kernels.attention.paged_attention`
with `k_scales` / `v_scales`): per layer, codes [num_blocks, block_size, kv_heads, width] int8 for
K and for V, and scales [num_blocks, block_size, kv_heads] fp32 for each. A step writes its new
rows into their slots (`batch.slot_mapping`) through `kernels.kv_quant`'s quantiser, then attends
once for the whole batch; on CUDA both are Triton kernels, on the CPU their references. Whole
prompts travel at full precision from a prefill service and are quantised on arrival (`load`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc_kernels.attention import TorchBackend
from zeroc.kv_cache import layer_shapes
from zeroc.policies.base import KVMethod, PolicyPools, check_budget, reference_bits

if TYPE_CHECKING:
    from zeroc.config import ModelConfig
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch
    from zeroc.model import Transformer

CODE_BITS = 8
SCALE_BITS = 32  # one fp32 scale per (token, KV head) row, as kernels/kv_quant.py stores it


def pool_shapes(shape: LayerShape, block_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """One layer's pools per block id (name -> (shape after num_blocks, dtype)), the kernels' layout."""
    t, h = block_size, shape.kv_heads
    return {"k_codes": ((t, h, shape.k_dim), torch.int8), "v_codes": ((t, h, shape.v_dim), torch.int8),
            "k_scales": ((t, h), torch.float32), "v_scales": ((t, h), torch.float32)}


@dataclass(frozen=True)
class Int8(KVMethod):
    """int8 per (token, KV head) row. Its bytes follow from the model's widths; `budget` is only a ceiling
    (`at_budget`), not a setting of the cache."""

    budget: float = 1.0  # ceiling on the held fraction of the uncompressed fp16 cache

    name = "int8"

    def __post_init__(self) -> None:
        check_budget(self.budget)

    @property
    def label(self) -> str:
        return "int8"

    def settings(self) -> dict:
        return {}

    def held_bits(self, shapes: list[LayerShape], tokens: int) -> float:
        return float(tokens * sum(s.kv_heads * ((s.k_dim + s.v_dim) * CODE_BITS + 2 * SCALE_BITS) for s in shapes))

    def fraction(self, cfg: ModelConfig) -> float:
        """Bits held per token / the uncompressed fp16 cache's (of the model's source widths)."""
        return self.held_bits(layer_shapes(cfg), 1) / reference_bits(cfg, 1)

    def nominal_fraction(self, head_dim: int = 64) -> float:
        return (2 * head_dim * CODE_BITS + 2 * SCALE_BITS) / (2 * head_dim * 16)

    def max_width_fraction(self, cfg: ModelConfig) -> float:
        """The largest fraction of the source K/V widths (ZeroC's rank budget) whose int8 cache, scales
        included, fits `budget`; above 1.0 the full widths fit. Only layer count, KV heads and head_dim
        matter, so the uncompressed model answers for its compressed versions."""
        rows = cfg.num_hidden_layers * cfg.num_key_value_heads
        return (self.budget * reference_bits(cfg, 1) - rows * 2 * SCALE_BITS) / (rows * 2 * cfg.head_dim * CODE_BITS)

    @classmethod
    def at_budget(cls, budget: float, cfg: ModelConfig, tokens: int, **fixed) -> Int8:
        method = cls(budget=budget, **fixed)
        held = method.fraction(cfg)
        if held > budget + 1e-9:
            raise ValueError(f"int8 holds {held:.4f} of the fp16 cache on this model (K/V widths "
                             f"{'/'.join(map(str, cfg.kv_geometry(0)[1:]))} in layer 0); budget {budget} is below that")
        return method

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        return sum(math.prod(dims) * kind.itemsize
                   for s in shapes for dims, kind in pool_shapes(s, block_size).values())

    def new_pools(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> Int8Pools:
        return Int8Pools(shapes, num_blocks, block_size, dtype, device)


def _pool(num_blocks: int, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          head_major: bool) -> Tensor:
    """A zeroed pool [num_blocks, *dims]; head_major (dims (block_size, kv_heads)): stored as [num_blocks,
    kv_heads, block_size] and returned as its transposed view, so the kernels see the logical shape."""
    if not head_major:
        return torch.zeros(num_blocks, *dims, dtype=dtype, device=device)
    t, h = dims
    return torch.zeros(num_blocks, h, t, dtype=dtype, device=device).transpose(1, 2)


class Int8Pools(PolicyPools):
    graph_safe = True  # the backend's quantising write and int8 attention, from device tensors alone

    def __init__(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.bs, self.dtype, self.device = block_size, dtype, device
        # per layer: k_codes [num_blocks, block_size, kv_heads, k_dim] int8, v_codes likewise with v_dim,
        # k_scales / v_scales [num_blocks, block_size, kv_heads] fp32, stored head-major: one KV head's scales of
        # a block lie side by side, so an attention tile reads them in a few sectors, not one per token
        self.layers = [{name: _pool(num_blocks, dims, kind, device, head_major=name.endswith("_scales"))
                       for name, (dims, kind) in pool_shapes(s, block_size).items()} for s in shapes]
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}
        self.backend = TorchBackend()  # the model's, once `prepare` sees it

    def prepare(self, model: Transformer) -> None:
        self.backend = model.backend

    def _write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        # slots: [n] flat slot of each row; k: [n, H, k_dim]; v: [n, H, v_dim]
        p = self.layers[layer]
        self.backend.quantize_into_slots(k, slots, p["k_codes"], p["k_scales"])
        self.backend.quantize_into_slots(v, slots, p["v_codes"], p["v_scales"])

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        # Write first, then read: the step's own rows are attended dequantised, as the evaluator does.
        self._write(layer, batch.slot_mapping, *self._staged.pop(layer))
        p = self.layers[layer]
        return self.backend.paged_attention(q, p["k_codes"], p["v_codes"], batch.block_tables, batch.seq_lens,
                                            batch.query_start_loc, scale, k_scales=p["k_scales"],
                                            v_scales=p["v_scales"], max_q=batch.max_query_len)

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, H, k_dim]; v: [T, H, v_dim] of tokens [0, T), at full precision from the wire. Rounded to
        # the cache dtype first, as the colocated model's own rows are.
        pos = torch.arange(k.shape[0], device=self.device)
        blocks = torch.tensor(table, dtype=torch.long, device=self.device)
        slots = blocks[pos // self.bs] * self.bs + pos % self.bs  # [T]
        self._write(layer, slots, k.to(self.device, self.dtype), v.to(self.device, self.dtype))
