"""int8 in the paged serving cache: every token's K/V rows as int8 codes with one fp32 scale each.

The streaming evaluator's `zeroc.policies.int8.Int8`, served: each (token, KV head) row of K and
V is quantised as it is written (max|x| / 127, `kernels/kv_quant.py`'s numerics) and attention
reads every row dequantised, the step's own included, so serving and `zeroc eval ppl
--streaming --kv-policy int8` agree. Stacked on a ZeroC-compressed model it quantises the
compressed rows: the pools hold the model's actual K/V widths.

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
from zeroc.serving_policies.base import PolicyStore, ServingKVPolicy

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch
    from zeroc.model import Transformer


def pool_shapes(shape: LayerShape, block_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """One layer's pools per block id (name -> (shape after num_blocks, dtype)), the kernels' layout."""
    t, h = block_size, shape.kv_heads
    return {"k_codes": ((t, h, shape.k_dim), torch.int8), "v_codes": ((t, h, shape.v_dim), torch.int8),
            "k_scales": ((t, h), torch.float32), "v_scales": ((t, h), torch.float32)}


@dataclass(frozen=True)
class Int8Serving(ServingKVPolicy):
    """int8 per (token, KV head) row; no hyperparameters (the bytes follow from the model's widths)."""

    @property
    def label(self) -> str:
        return "int8"

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        return sum(math.prod(dims) * kind.itemsize
                   for s in shapes for dims, kind in pool_shapes(s, block_size).values())

    def new_store(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> Int8Store:
        return Int8Store(shapes, num_blocks, block_size, dtype, device)


class Int8Store(PolicyStore):
    def __init__(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.bs, self.dtype, self.device = block_size, dtype, device
        # per layer: k_codes [num_blocks, block_size, kv_heads, k_dim] int8, v_codes likewise with v_dim,
        # k_scales / v_scales [num_blocks, block_size, kv_heads] fp32
        self.pools = [{name: torch.zeros(num_blocks, *dims, dtype=kind, device=device)
                       for name, (dims, kind) in pool_shapes(s, block_size).items()} for s in shapes]
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}
        self.backend = TorchBackend()  # the model's, once `prepare` sees it

    def prepare(self, model: Transformer) -> None:
        self.backend = model.backend

    def _write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        # slots: [n] flat slot of each row; k: [n, H, k_dim]; v: [n, H, v_dim]
        p = self.pools[layer]
        self.backend.quantize_into_slots(k, slots, p["k_codes"], p["k_scales"])
        self.backend.quantize_into_slots(v, slots, p["v_codes"], p["v_scales"])

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        # Write first, then read: the step's own rows are attended dequantised, as the evaluator does.
        self._write(layer, batch.slot_mapping, *self._staged.pop(layer))
        p = self.pools[layer]
        return self.backend.paged_attention(q, p["k_codes"], p["v_codes"], batch.block_tables, batch.seq_lens,
                                            batch.query_start_loc, scale, k_scales=p["k_scales"],
                                            v_scales=p["v_scales"])

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, H, k_dim]; v: [T, H, v_dim] of tokens [0, T), at full precision from the wire. Rounded to
        # the cache dtype first, as the colocated model's own rows are.
        pos = torch.arange(k.shape[0], device=self.device)
        blocks = torch.tensor(table, dtype=torch.long, device=self.device)
        slots = blocks[pos // self.bs] * self.bs + pos % self.bs  # [T]
        self._write(layer, slots, k.to(self.device, self.dtype), v.to(self.device, self.dtype))
