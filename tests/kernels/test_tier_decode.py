"""A token tier's decode segment (kernels/tier_decode.py): the Triton kernel against its reference, with
every row the query does not see poisoned with NaN, and the reference against attention computed by hand
over the gathered keys."""

from __future__ import annotations

import math

import pytest
import torch

from zeroc_kernels.tier_decode import tier_decode, tier_decode_ref


def _by_hand(q, pool, k_dim, slots, k_own, v_own, parts, lses, scale, width, per_block):
    """Per sequence and head: the seen keys gathered one by one, one softmax over them and the partials'."""
    b, heads, _ = q.shape
    kv, row = pool.shape[2], pool.shape[3]
    tier_k, v_dim = q.shape[-1] - k_dim, row - k_dim
    flat = pool.view(pool.shape[0], -1).double()
    out = torch.zeros(b, heads, v_own.shape[-1], dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            g = h // (heads // kv)
            keys, values = [], []
            for j in range(slots.blocks.shape[1]):
                if slots.seen[i, j]:
                    at = j * kv * width + g * width + torch.arange(width)
                    extra = flat[slots.tier_ids[i, at // per_block], at % per_block]
                    comp = pool[slots.blocks[i, j], slots.offsets[i, j], g].double()
                    keys.append(torch.cat([comp[:k_dim], extra[:tier_k]]))
                    values.append(torch.cat([comp[k_dim:], extra[tier_k:]]))
            if slots.seen[i, -1]:
                keys.append(k_own[i, g].double())
                values.append(v_own[i, g].double())
            scores = [q[i, h].double() @ k * scale for k in keys] + list(lses[i, h].double())
            vals = values + [torch.cat([p.double(), torch.zeros(v_own.shape[-1] - v_dim)]) for p in parts[i, h]]
            weights = torch.softmax(torch.stack(scores), 0)
            out[i, h] = sum(w * v for w, v in zip(weights, vals))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_the_reference_is_one_softmax_over_the_seen_keys_and_the_partials(tier_decode_case, seed):
    args, (width, per_block) = tier_decode_case(seed)
    got = tier_decode_ref(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _by_hand(*args, width, per_block), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed, kw", [
    (0, {}),
    (1, {"group": 1, "parts": 1}),
    (2, {"kv": 1, "group": 8, "dims": (40, 24, 24, 40), "held": 10}),  # a per-KV-head-rank layer's one row
    (3, {"dims": (16, 16, 48, 48), "held": 3, "parts": 5}),
    (4, {"own_seen": False}),  # no recent window: the token's own key is in the compressed segment
    (5, {"dims": (16, 16, 0, 8)}),  # no tier dims of keys
    (6, {"dims": (16, 16, 0, 0)}),  # none at all: no borrowed block
])
def test_the_kernel_matches_its_reference(tier_decode_case, seed, kw):
    args, _ = tier_decode_case(seed, **kw)
    want = tier_decode_ref(*args)
    got = tier_decode(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_kernel_matches_in_bfloat16(tier_decode_case):
    args, _ = tier_decode_case(5, dtype=torch.bfloat16)
    torch.testing.assert_close(tier_decode(*args).float(), tier_decode_ref(*args).float(), rtol=2e-2, atol=2e-2)


def test_mismatched_shapes_are_clear_errors(tier_decode_case):
    args, _ = tier_decode_case(6)
    q, pool, k_dim, slots, k_own, v_own, parts, lses, scale = args
    with pytest.raises(ValueError, match="partials"):
        tier_decode_ref(q, pool, k_dim, slots, k_own, v_own, parts[..., :-1], lses, scale)
    with pytest.raises(ValueError, match="one row per sequence"):
        tier_decode(q, pool, k_dim, slots, k_own[:-1], v_own, parts, lses, scale)
    with pytest.raises(ValueError, match="contiguous"):
        tier_decode(q, pool.transpose(0, 1), k_dim, slots, k_own, v_own, parts, lses, scale)
