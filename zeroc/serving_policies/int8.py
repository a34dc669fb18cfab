"""int8 in the paged serving cache: every token's K/V rows as int8 codes with one fp32 scale each.

The streaming evaluator's `zeroc.policies.int8.Int8`, served: each (token, KV head) row of K and
V is quantised as it is written (max|x| / 127, `kernels/kv_quant.py`'s numerics) and attention
reads every row dequantised, the step's own included, so serving and `zeroc eval ppl
--streaming --kv-policy int8` agree. Stacked on a ZeroC-compressed model it quantises the
compressed rows: the block holds the model's actual K/V widths.

A block id costs one row of bytes per layer: codes [block_size, kv_heads, width] and scales
[block_size, kv_heads] for K and for V, the per-block shapes the int8 paged-decode kernel reads.
Whole prompts travel at full precision from a prefill service and are encoded on arrival (`load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.policies.int8 import dequantize_rows, quantize_rows
from zeroc.serving_policies.base import PolicyStore, ServingKVPolicy, batch_sequences, ceil_div
from zeroc.serving_policies.kivi import mixed_attention
from zeroc.serving_policies.layout import RowLayout

if TYPE_CHECKING:
    from zeroc.kv_cache import BlockAllocator, LayerShape, PagedBatch


@dataclass(frozen=True)
class Int8Serving(ServingKVPolicy):
    """int8 per (token, KV head) row; no hyperparameters (the bytes follow from the model's widths)."""

    @property
    def label(self) -> str:
        return "int8"

    @staticmethod
    def layout(shape: LayerShape, block_size: int) -> RowLayout:
        t, h = block_size, shape.kv_heads
        return RowLayout([("k_codes", (t, h, shape.k_dim), torch.int8), ("k_scale", (t, h), torch.float32),
                          ("v_codes", (t, h, shape.v_dim), torch.int8), ("v_scale", (t, h), torch.float32)])

    def block_bytes(self, shapes: list[LayerShape], block_size: int, dtype: torch.dtype) -> int:
        return sum(self.layout(s, block_size).row_bytes for s in shapes)

    def new_store(self, shapes: list[LayerShape], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, allocator: BlockAllocator) -> Int8Store:
        return Int8Store(self, shapes, num_blocks, block_size, dtype, device)


class Int8Store(PolicyStore):
    def __init__(self, policy: Int8Serving, shapes: list[LayerShape], num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.shapes, self.bs, self.dtype = shapes, block_size, dtype
        self.layouts = [policy.layout(s, block_size) for s in shapes]
        # arena: [num_blocks, row_bytes] uint8 per layer
        self.arenas = [torch.zeros(num_blocks, lay.row_bytes, dtype=torch.uint8, device=device)
                       for lay in self.layouts]
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    def _read(self, layer: int, table: list[int], tokens: int) -> tuple[Tensor, Tensor]:
        """Dequantised K/V of tokens [0, tokens) -> [tokens, H, k_dim], [tokens, H, v_dim]."""
        s = self.shapes[layer]
        f = self.layouts[layer].unpack(self.arenas[layer][table[: ceil_div(tokens, self.bs)]])
        k = dequantize_rows(f["k_codes"], f["k_scale"], self.dtype).reshape(-1, s.kv_heads, s.k_dim)
        v = dequantize_rows(f["v_codes"], f["v_scale"], self.dtype).reshape(-1, s.kv_heads, s.v_dim)
        return k[:tokens], v[:tokens]

    def _write(self, layer: int, table: list[int], start: int, k: dict[str, Tensor], v: dict[str, Tensor]) -> None:
        """Store the quantised rows of tokens [start, start + n): k {"k_codes": [n, H, k_dim] int8,
        "k_scale": [n, H] fp32}, v likewise ("v_codes", "v_scale")."""
        end = start + k["k_codes"].shape[0]
        ids = table[start // self.bs: ceil_div(end, self.bs)]
        lay, arena = self.layouts[layer], self.arenas[layer]
        fields = lay.unpack(arena[ids])  # read-modify-write: the first block may hold earlier tokens
        lo = start - start // self.bs * self.bs
        for name, rows in {**k, **v}.items():
            flat = fields[name].view(-1, *fields[name].shape[2:])  # [len(ids) * block_size, H, ...]
            flat[lo: lo + rows.shape[0]] = rows
        arena[ids] = lay.pack(fields)

    @staticmethod
    def _encode(k: Tensor, v: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # k: [n, H, k_dim]; v: [n, H, v_dim]
        kc, ks = quantize_rows(k)
        vc, vs = quantize_rows(v)
        return {"k_codes": kc, "k_scale": ks}, {"v_codes": vc, "v_scale": vs}

    def stage(self, layer: int, k: Tensor, v: Tensor) -> None:
        self._staged[layer] = (k, v)

    def attend(self, layer: int, q: Tensor, batch: PagedBatch, scale: float) -> Tensor:
        k_new, v_new = self._staged.pop(layer)
        out = q.new_empty(q.shape[0], q.shape[1], v_new.shape[-1])
        for cur, new, table, rows in batch_sequences(batch):
            kq, vq = self._encode(k_new[rows], v_new[rows])
            k_old, v_old = self._read(layer, table, cur)
            k = torch.cat([k_old, dequantize_rows(kq["k_codes"], kq["k_scale"], self.dtype)])
            v = torch.cat([v_old, dequantize_rows(vq["v_codes"], vq["v_scale"], self.dtype)])
            pos, keys = torch.arange(cur, new, device=q.device), torch.arange(new, device=q.device)
            causal = keys[None, :] <= pos[:, None]  # [n, new]
            # every pair reads the dequantised form (the evaluator quantises each token before attending)
            out[rows] = mixed_attention(q[rows], (k, v), (k, v), causal, causal, scale)
            self._write(layer, table, cur, kq, vq)
        return out

    def load(self, layer: int, table: list[int], k: Tensor, v: Tensor) -> None:
        # k: [T, H, k_dim]; v: [T, H, v_dim] of tokens [0, T), at full precision from the wire
        self._write(layer, table, 0, *self._encode(k.to(self.dtype), v.to(self.dtype)))
