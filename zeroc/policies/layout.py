"""Byte rows holding several typed tensors, and bit-packing of small integer codes.

A policy that stores mixed content per block (packed codes, scales, zero points) keeps each
layer's pool as one uint8 tensor [num_blocks, row_bytes], so a block id costs exactly
`row_bytes` per layer and a block's bytes can be reinterpreted (KIVI lends several rows to one
full-precision block while it fills).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALIGN = 8  # every field starts on an 8-byte boundary so it can be viewed as any dtype


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]  # per block
    dtype: torch.dtype
    offset: int
    nbytes: int


class RowLayout:
    """Named fields at aligned offsets inside one uint8 row per block."""

    def __init__(self, fields: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.fields: dict[str, Field] = {}
        offset = 0
        for name, shape, dtype in fields:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self.fields[name] = Field(name, shape, dtype, offset, nbytes)
            offset += -(-nbytes // ALIGN) * ALIGN
        self.row_bytes = offset

    def unpack(self, rows: Tensor) -> dict[str, Tensor]:
        """rows: [n, row_bytes] uint8 -> {name: [n, *shape] of the field's dtype} (copies)."""
        out = {}
        for f in self.fields.values():
            raw = rows[:, f.offset: f.offset + f.nbytes].contiguous()
            out[f.name] = raw.view(f.dtype).reshape(rows.shape[0], *f.shape)
        return out

    def pack(self, values: dict[str, Tensor]) -> Tensor:
        """{name: [n, *shape]} -> rows [n, row_bytes] uint8."""
        n = next(iter(values.values())).shape[0]
        rows = torch.zeros(n, self.row_bytes, dtype=torch.uint8, device=next(iter(values.values())).device)
        for f in self.fields.values():
            data = values[f.name].to(f.dtype).contiguous().reshape(n, -1)
            rows[:, f.offset: f.offset + f.nbytes] = data.view(torch.uint8)
        return rows


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes in [0, 2**bits) along the last dim ([..., d], d a multiple of 8 / bits) -> [..., d * bits / 8] uint8."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_codes`: [..., d * bits / 8] uint8 -> [..., d] uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[..., None] >> shifts) & mask).reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))
