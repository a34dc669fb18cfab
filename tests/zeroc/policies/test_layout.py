"""Packed codes and byte rows, by hand."""

from __future__ import annotations

import torch

from zeroc.policies.layout import RowLayout, pack_codes, unpack_codes


def test_codes_pack_low_bits_first():
    codes = torch.tensor([[1, 2, 15, 0]])
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F]]
    assert pack_codes(codes % 4, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        c = torch.randint(0, 2 ** bits, (3, 5, 16), generator=g)
        assert torch.equal(unpack_codes(pack_codes(c, bits), bits), c.to(torch.uint8))


def test_fields_sit_at_aligned_offsets_and_round_trip():
    lay = RowLayout([("codes", (2, 3), torch.uint8), ("scale", (3,), torch.float32), ("pos", (1,), torch.float64)])
    assert [f.offset for f in lay.fields.values()] == [0, 8, 24] and lay.row_bytes == 32  # 6 -> 8, 12 -> 16
    values = {"codes": torch.arange(12, dtype=torch.uint8).view(2, 2, 3), "scale": torch.randn(2, 3),
              "pos": torch.tensor([[1.5], [-2.0]], dtype=torch.float64)}
    back = lay.unpack(lay.pack(values))
    assert all(torch.equal(back[k], values[k]) for k in values)
