"""The fold- and rotate-mode QKV epilogue kernels, RoPE alone and a tier layer's joined q, k, v against their
references, and the references against the model's own RoPE (and rotate-mode bases)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zeroc_kernels.qkv_epilogue import (qkv_epilogue, qkv_epilogue_ref, qkv_rotate_epilogue, qkv_rotate_epilogue_ref,
                                       rope, rope_ref, tier_qkv, tier_qkv_ref)
from zeroc.config import RopeConfig
from zeroc.model import rotate_qk
from zeroc.rope import apply_rope, rope_cos_sin, rope_inv_freq


def _case(gen, n, kv, group, r, rv, block_size, dtype):
    q = torch.randn(n, kv * group, r, generator=gen).to(dtype)
    k = torch.randn(n, kv, r, generator=gen).to(dtype)
    v = torch.randn(n, kv, rv, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (n,), generator=gen)
    base = rope_inv_freq(RopeConfig(theta=10000.0), 128)
    inv_freq = torch.stack([base[torch.randperm(64, generator=gen)[: r // 2].sort().values] for _ in range(kv)])
    blocks = -(-n // block_size) + 1
    slots = torch.randperm(blocks * block_size, generator=gen)[:n]
    return q, k, v, positions, inv_freq, slots, blocks


@settings(max_examples=16, deadline=None)
@given(n=st.integers(1, 40), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 4, 8]),
       ranks=st.sampled_from([(16, 16), (32, 64), (64, 48), (128, 128)]), block_size=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16), shared=st.booleans())
def test_kernel_matches_reference(n, kv, group, ranks, block_size, dtype, seed, shared):
    """shared: one frequency row for every KV head (an uncompressed layer's), as the model passes it."""
    r, rv = ranks
    q, k, v, pos, inv_freq, slots, blocks = _case(torch.Generator().manual_seed(seed), n, kv, group, r, rv,
                                                  block_size, dtype)
    inv_freq = inv_freq[:1] if shared else inv_freq
    pools = [(torch.full((blocks, block_size, kv, r), float("nan"), dtype=dtype),
              torch.full((blocks, block_size, kv, rv), float("nan"), dtype=dtype)) for _ in range(2)]
    q_ref = qkv_epilogue_ref(q, k, v, pos, inv_freq, slots, *pools[0])
    q_tri = qkv_epilogue(q, k, v, pos, inv_freq, slots, *pools[1])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(q_tri.float(), q_ref.float(), **tol)
    for a, b in zip(pools[0], pools[1]):
        torch.testing.assert_close(b.float(), a.float(), equal_nan=True, **tol)


def test_reference_equals_the_models_rope_on_the_kept_pairs():
    gen = torch.Generator().manual_seed(1)
    q, k, v, pos, inv_freq, slots, blocks = _case(gen, 5, 2, 4, 32, 16, 16, torch.float32)
    k_pool, v_pool = torch.zeros(blocks, 16, 2, 32), torch.zeros(blocks, 16, 2, 16)
    q_rot = qkv_epilogue_ref(q, k, v, pos, inv_freq, slots, k_pool, v_pool)
    cos, sin = rope_cos_sin(inv_freq, pos, torch.float32)  # [N, kv, r]
    torch.testing.assert_close(k_pool.view(-1, 2, 32)[slots], apply_rope(k, cos, sin))
    torch.testing.assert_close(q_rot, apply_rope(q, cos.repeat_interleave(4, -2), sin.repeat_interleave(4, -2)))
    torch.testing.assert_close(v_pool.view(-1, 2, 16)[slots], v)


def _rotate_case(gen, n, kv, group, d, r, rv, block_size, dtype):
    q = torch.randn(n, kv * group, d, generator=gen).to(dtype)
    k = torch.randn(n, kv, d, generator=gen).to(dtype)
    v = torch.randn(n, kv, rv, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (n,), generator=gen)
    inv_freq = rope_inv_freq(RopeConfig(theta=10000.0), d)[None]
    q_basis = (torch.randn(kv, d, r, generator=gen) / d ** 0.5).to(dtype)
    k_basis = (torch.randn(kv, d, r, generator=gen) / d ** 0.5).to(dtype)
    blocks = -(-n // block_size) + 1
    slots = torch.randperm(blocks * block_size, generator=gen)[:n]
    return (q, k, v, positions, inv_freq, q_basis, k_basis, slots), blocks


@settings(max_examples=12, deadline=None)
@given(n=st.sampled_from([1, 5, 24, 64, 90]), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4, 8]),
       shape=st.sampled_from([(64, 16, 16), (64, 48, 8), (64, 40, 24), (128, 64, 64), (32, 24, 32)]),
       block_size=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_rotate_kernel_matches_reference(n, kv, group, shape, block_size, dtype, seed):
    d, r, rv = shape
    args, blocks = _rotate_case(torch.Generator().manual_seed(seed), n, kv, group, d, r, rv, block_size, dtype)
    pools = [(torch.full((blocks, block_size, kv, r), float("nan"), dtype=dtype),
              torch.full((blocks, block_size, kv, rv), float("nan"), dtype=dtype)) for _ in range(2)]
    q_ref = qkv_rotate_epilogue_ref(*args, *pools[0])
    q_tri = qkv_rotate_epilogue(*args, *pools[1])
    assert q_tri.shape == (n, kv * group, r)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(q_tri.float(), q_ref.float(), **tol)
    for a, b in zip(pools[0], pools[1]):
        torch.testing.assert_close(b.float(), a.float(), equal_nan=True, **tol)


def test_rotate_reference_equals_the_models_rope_then_bases():
    args, blocks = _rotate_case(torch.Generator().manual_seed(2), 6, 2, 4, 64, 24, 16, 16, torch.float32)
    q, k, v, pos, inv_freq, q_basis, k_basis, slots = args
    k_pool, v_pool = torch.zeros(blocks, 16, 2, 24), torch.zeros(blocks, 16, 2, 16)
    q_out = qkv_rotate_epilogue_ref(*args, k_pool, v_pool)
    cos, sin = rope_cos_sin(inv_freq, pos, torch.float32)  # [N, 1, d]
    q_model, k_model = rotate_qk(apply_rope(q, cos, sin), apply_rope(k, cos, sin), q_basis, k_basis)
    torch.testing.assert_close(q_out, q_model)
    torch.testing.assert_close(k_pool.view(-1, 2, 24)[slots], k_model)
    torch.testing.assert_close(v_pool.view(-1, 2, 16)[slots], v)


@settings(max_examples=16, deadline=None)
@given(lead=st.sampled_from([(5,), (2, 7), (0,)]), kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4]),
       r=st.sampled_from([2, 16, 40]), per_head=st.booleans(), sliced=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
@example(lead=(2, 7), kv=2, group=4, r=16, per_head=False, sliced=True, dtype=torch.float32, seed=0)  # 4 a program
def test_rope_kernel_matches_its_reference_and_the_models_tables(lead, kv, group, r, per_head, sliced, dtype, seed):
    """RoPE alone (`rope`, the triton backend's for layers the epilogues do not serve): any leading dims, one
    frequency row or one per KV head (query heads share their group's; a program takes up to 4 heads of one
    row), x a column slice of a wider output (a fused projection's); against `rope_ref`, and that against the
    model's eager tables (zeroc.rope)."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv * group
    wide = torch.randn(*lead, heads * r + (24 if sliced else 0), generator=gen).to(dtype)
    x = wide[..., : heads * r].unflatten(-1, (heads, r))  # [*P, heads, r], rows strided where sliced
    positions = torch.randint(0, 4096, lead, generator=gen)
    base = rope_inv_freq(RopeConfig(theta=10000.0), 128)
    inv_freq = torch.stack([base[torch.randperm(64, generator=gen)[: r // 2 + 3].sort().values]
                            for _ in range(kv if per_head else 1)])[:, : r // 2]  # a column slice, as a run's
    want = rope_ref(x, positions, inv_freq)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rope(x, positions, inv_freq), want, **tol)
    cos, sin = rope_cos_sin(inv_freq, positions, torch.float32)  # [*P, rows, r]
    rows = heads // inv_freq.shape[0]
    tables = apply_rope(x.float(), cos.repeat_interleave(rows, -2), sin.repeat_interleave(rows, -2))
    torch.testing.assert_close(want.float(), tables, **tol)


def test_rope_refuses_frequencies_that_do_not_fit():
    x = torch.randn(4, 6, 16)
    with pytest.raises(ValueError, match="frequencies"):
        rope(x, torch.arange(4), torch.rand(4, 8))  # 4 rows for 6 heads
    with pytest.raises(ValueError, match="frequencies"):
        rope_ref(x, torch.arange(4), torch.rand(1, 6))
    with pytest.raises(ValueError, match="positions"):
        rope(x, torch.arange(3), torch.rand(1, 8))


def _tier_case(gen, lead, kv, group, d, r, rv, per_head, dtype):
    """A fold tier layer's six projections as column slices of one fused GEMM output [*P, W] (strided rows), and
    frequencies: each KV head's kept pairs and the pairs it drops, or one row for all."""
    heads = kv * group
    widths = [heads * r, kv * r, kv * rv, heads * (d - r), kv * (d - r), kv * (d - rv)]
    wide = torch.randn(*lead, sum(widths), generator=gen).to(dtype)
    parts = [p.unflatten(-1, (h, -1)) for p, h in zip(wide.split(widths, -1), [heads, kv, kv, heads, kv, kv])]
    base = rope_inv_freq(RopeConfig(theta=10000.0), d)
    order = [torch.randperm(d // 2, generator=gen) for _ in range(kv if per_head else 1)]
    inv_freq = torch.stack([base[o[: r // 2].sort().values] for o in order])
    tier_inv_freq = torch.stack([base[o[r // 2:].sort().values] for o in order])
    return (*parts, torch.randint(0, 4096, lead, generator=gen), inv_freq, tier_inv_freq)


@settings(max_examples=16, deadline=None)
@given(lead=st.sampled_from([(1,), (5,), (2, 7), (70,), (0,)]), kv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 3, 4]), shape=st.sampled_from([(16, 6, 10), (16, 16, 4), (32, 2, 32), (10, 4, 6)]),
       per_head=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
@example(lead=(5,), kv=2, group=4, shape=(8, 8, 8), per_head=True, dtype=torch.float32, seed=0)  # no tier dims
def test_tier_qkv_kernel_matches_its_reference(lead, kv, group, shape, per_head, dtype, seed):
    """A fold tier layer's full-rank q, k, v in one kernel (`tier_qkv`): any leading dims, projections read in
    place from a fused output, frequencies per KV head or shared, a layer that keeps every pair (no tier q, k dims)
    or every V dim; against `tier_qkv_ref`: bit for bit where no RoPE runs (v), to rounding elsewhere."""
    args = _tier_case(torch.Generator().manual_seed(seed), lead, kv, group, *shape, per_head, dtype)
    got, want = tier_qkv(*args), tier_qkv_ref(*args)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        torch.testing.assert_close(g, w, **tol)
    torch.testing.assert_close(got[2], want[2], atol=0, rtol=0)


def test_tier_qkv_reference_is_rope_on_each_part_then_the_joins():
    """The reference against the model's tables: the compressed dims RoPE'd at the kept pairs, the tier's at the
    dropped ones, and q.k at full rank is the compressed score plus the tier's."""
    q, k, v, qt, kt, vt, pos, f, tf = _tier_case(torch.Generator().manual_seed(3), (6,), 2, 4, 16, 6, 10, True,
                                                 torch.float32)
    q_full, k_full, v_full = tier_qkv_ref(q, k, v, qt, kt, vt, pos, f, tf)
    for x, y, freqs in ((q, q_full[..., :6], f), (qt, q_full[..., 6:], tf), (k, k_full[..., :6], f),
                        (kt, k_full[..., 6:], tf)):
        cos, sin = rope_cos_sin(freqs, pos, torch.float32)  # [N, kv, w]
        rows = x.shape[-2] // 2
        torch.testing.assert_close(y, apply_rope(x, cos.repeat_interleave(rows, -2), sin.repeat_interleave(rows, -2)))
    assert torch.equal(v_full, torch.cat([v, vt], -1))


def test_tier_qkv_refuses_frequencies_that_do_not_fit():
    q, k, v, qt, kt, vt, pos, f, tf = _tier_case(torch.Generator().manual_seed(4), (3,), 2, 3, 16, 6, 10, True,
                                                 torch.float32)
    with pytest.raises(ValueError, match="frequencies"):
        tier_qkv(q, k, v, qt, kt, vt, pos, f, tf[:, :2])
    with pytest.raises(ValueError, match="1 or 2 rows"):
        tier_qkv(q.repeat(1, 2, 1), k, v, qt.repeat(1, 2, 1), kt, vt, pos, f.repeat(3, 1), tf.repeat(3, 1))
