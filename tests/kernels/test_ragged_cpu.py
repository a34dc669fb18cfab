"""The ragged CPU attention kernel (kernels/ragged_cpu.py) against paged_attention_ref, on the same matrix as
the Triton kernels: block sizes 8/16/32, GQA 1/3/4/8, ZeroC widths (q/k != v), prefill from scratch, after a
cached prefix and decode rows in one batch, every slot outside the contexts NaN, strided per-head views, int8
pools and bf16 through the `cpu` backend."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc_kernels.attention import CpuBackend, select_backend
from zeroc_kernels.paged_attention import paged_attention_int8_ref, paged_attention_ref
from zeroc_kernels.ragged_cpu import (build_ragged_kernel, cpu_isa, kernel_dir, load_ragged_kernel,
                                      ragged_decode_partials, ragged_paged_attention)


@pytest.fixture(scope="module")
def kernel(cpu_kernel):
    return cpu_kernel


def _case(random_paged_kv, poison_unused_slots, gen, seqs, block_size, kv_heads, group, dq, dv):
    """seqs: (new tokens, cached prefix tokens) per sequence -> q, k, v (NaN outside the contexts), tables,
    seq_lens, query_start_loc"""
    lens = [n + c for n, c in seqs]
    k_cache, v_cache, tables = random_paged_kv(gen, lens, block_size, kv_heads, dq, dv, torch.float32)
    seq_lens = torch.tensor(lens)
    k_cache, v_cache = (poison_unused_slots(c, tables, seq_lens) for c in (k_cache, v_cache))
    q_lens = [n for n, _ in seqs]
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    q = torch.randn(sum(q_lens), kv_heads * group, dq, generator=gen)
    return q, k_cache, v_cache, tables, seq_lens, starts


@settings(max_examples=30, deadline=None)
@given(
    block_size=st.sampled_from([8, 16, 32]),
    group=st.sampled_from([1, 3, 4, 8]),
    kv_heads=st.sampled_from([1, 2]),
    dims=st.sampled_from([(32, 32), (64, 64), (48, 32), (40, 48), (48, 16), (128, 128)]),
    seqs=st.lists(st.tuples(st.sampled_from([1, 1, 2, 17, 40, 70]), st.sampled_from([0, 0, 5, 64, 100, 300])),
                  min_size=1, max_size=4),
    threads=st.sampled_from([1, 2]),
    pools=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(kernel, random_paged_kv, poison_unused_slots, block_size, group, kv_heads, dims,
                                  seqs, threads, pools, seed):
    """Prefill from scratch, prefill after a cached prefix, decode rows, in one ragged batch; fp32 and bf16 pools
    (read in place: a bf16 row widened to fp32 exactly, so the reference is fp32 attention over the same values)."""
    dq, dv = dims
    gen = torch.Generator().manual_seed(seed)
    case = _case(random_paged_kv, poison_unused_slots, gen, seqs, block_size, kv_heads, group, dq, dv)
    case = (case[0], case[1].to(pools), case[2].to(pools), *case[3:])
    scale = 1.0 / math.sqrt(dq)
    ref = paged_attention_ref(case[0], case[1].float(), case[2].float(), *case[3:], scale)
    torch.set_num_threads(threads)  # restored after the test (conftest.py)
    out = ragged_paged_attention(kernel, *case, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decode", [True, False])
def test_reads_one_runs_columns_of_a_per_head_row_in_place(kernel, random_paged_kv, decode):
    """Per-KV-head ranks: each run of equal-rank heads is a column view of one wider pool row."""
    from zeroc.head_ranks import HeadLayout

    gen = torch.Generator().manual_seed(7)
    layout = HeadLayout.of((16, 16, 40), (8, 8, 24), group=2)
    lens = [37, 5, 20]
    k_row, v_row, tables = random_paged_kv(gen, lens, 16, 1, 2 * 16 + 40, 2 * 8 + 24, torch.float32)
    q_lens = [1] * 3 if decode else [9, 5, 1]
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    for run, kv, vv in zip(layout.runs, layout.pool_views(k_row, [16, 40]), layout.pool_views(v_row, [8, 24])):
        assert not kv.is_contiguous()
        q = torch.randn(sum(q_lens), run.heads * 2, run.qk, generator=gen)
        want = paged_attention_ref(q, kv.contiguous(), vv.contiguous(), tables, torch.tensor(lens), starts, 0.125)
        got = ragged_paged_attention(kernel, q, kv, vv, tables, torch.tensor(lens), starts, 0.125)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_long_prompt_beside_decodes_in_many_tiles(kernel, random_paged_kv, poison_unused_slots):
    """A prompt longer than many query tiles, one after a cached prefix whose last tile is a single row (65 =
    2 tiles of 32 rows at group 3, plus 1), with decode rows; int32 tables."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, tables, lens, starts = _case(random_paged_kv, poison_unused_slots, gen, [(300, 0), (65, 45), (1, 600)],
                                          16, 2, 3, 64, 64)
    ref = paged_attention_ref(q, k, v, tables, lens, starts, 0.125)
    out = ragged_paged_attention(kernel, q, k, v, tables.int(), lens.int(), starts.int(), 0.125)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cpu_backend_serves_int8_and_bf16_as_the_references(kernel, random_paged_kv, poison_unused_slots,
                                                            int8_pools):
    gen = torch.Generator().manual_seed(5)
    q, k, v, tables, lens, starts = _case(random_paged_kv, poison_unused_slots, gen, [(33, 77), (1, 40), (20, 0)],
                                          16, 2, 3, 48, 32)
    backend = select_backend("cpu", "cpu")
    assert isinstance(backend, CpuBackend) and backend.kernel is not None
    kq, ks, vq, vs = int8_pools(k.nan_to_num(), v.nan_to_num())
    ks, vs = (poison_unused_slots(s, tables, lens) for s in (ks, vs))
    want = paged_attention_int8_ref(q, kq, vq, ks, vs, tables, lens, starts, 0.1)
    got = backend.paged_attention(q, kq, vq, tables, lens, starts, 0.1, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):  # bf16 pools read in place, fp16 through fp32 copies of blocks
        qb, kb, vb = q.to(dtype), k.to(dtype), v.to(dtype)
        want = paged_attention_ref(qb, kb, vb, tables, lens, starts, 0.1)
        got = backend.paged_attention(qb, kb, vb, tables, lens, starts, 0.1)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(48, 32), (40, 24)])  # dv a multiple of 16 (the register path) or not
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_partials_from_a_key_start_are_the_reference(kernel, random_paged_kv, poison_unused_slots, dims,
                                                            threads, pool_dtype):
    """A token tier's compressed segment: one query per sequence over its keys [key_start, seq_len) of column
    views of a wider row (as the tier pools hold K and V side by side), with each output's LSE; a sequence with
    no key there (seq_len == key_start, or 0) gets 0 and -inf. Few sequences (an item per KV head) and many (whole
    rows per item)."""
    from zeroc_kernels.paged_decode import decode_partials_ref

    dq, dv = dims
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(sum(dims) + threads)
    for lens, start in (([5, 40, 130], 5), ([0, 3, 3, 20, 17, 64, 200, 33], 3), ([1, 16, 17, 100], 0)):
        pools, _, tables = random_paged_kv(gen, [max(n, 1) for n in lens], 16, 2, dq + dv, 8, torch.float32)
        seq_lens = torch.tensor(lens)
        pools = poison_unused_slots(pools, tables, seq_lens).to(pool_dtype)
        k, v = pools[..., :dq], pools[..., dq:]  # [blocks, 16, 2, dq] and [..., dv]: strided views
        q = torch.randn(len(lens), 6, dq, generator=gen)
        want, want_lse = decode_partials_ref(q, k.float(), v.float(), tables, seq_lens, 0.3, start)
        got, lse = ragged_decode_partials(kernel, q, k, v, tables, seq_lens, 0.3, start)
        assert got.shape == want.shape and lse.shape == want_lse.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
        empty = seq_lens <= start
        assert (got[empty] == 0).all() and torch.isneginf(lse[empty]).all() and bool(empty.any()) == (start > 0)
    with pytest.raises(ValueError, match="key_start"):
        ragged_decode_partials(kernel, q, k, v, tables, seq_lens, 0.3, -1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kw", [{}, {"b": 9, "kv": 1, "group": 8, "dims": (40, 24, 24, 40), "held": 20, "parts": 4},
                                {"own_seen": False}, {"dtype": torch.bfloat16}, {"dtype": torch.float16}])
def test_tier_decode_is_the_reference(kernel, tier_decode_case, threads, kw, monkeypatch):
    """A token tier's full-rank segment merged with the compressed partials (csrc/tier_decode.cpp): tier rows
    straddling borrowed blocks, every unseen row NaN, a KV head per item or whole groups of 8, no recent window
    (the own row unseen), bf16 pools (read in place, widened exactly: both sides compute in fp32 and round once to
    bf16, so they agree to a bf16 rounding) and fp16 ones (which take the reference)."""
    from zeroc_kernels.ragged_cpu import ragged_tier_decode
    from zeroc_kernels.tier_decode import tier_decode_ref

    torch.set_num_threads(threads)
    args, _ = tier_decode_case(threads + 20, **kw)
    if args[1].dtype != torch.float16:  # the kernel's pools: the reference must not serve them
        monkeypatch.setattr("zeroc_kernels.ragged_cpu.tier_decode_ref", None)
    got = ragged_tier_decode(kernel, *args)
    assert torch.isfinite(got).all() and got.dtype == args[0].dtype
    tol = 1e-5 if args[0].dtype == torch.float32 else 8e-3  # fp32, or one half-precision rounding of the output
    torch.testing.assert_close(got.float(), tier_decode_ref(*args).float(), atol=tol, rtol=tol)


def test_a_built_kernel_is_imported_not_rebuilt(kernel):
    """Later loads (other processes, the image's runtime stage) import the build; no compiler runs."""
    path = build_ragged_kernel(cpu_isa())
    assert path.exists() and path.parent == kernel_dir()
    assert load_ragged_kernel() is kernel
    assert Path(kernel.__file__) == path


def test_bad_batches_are_value_errors_naming_the_field(kernel):
    k = torch.zeros(2, 16, 1, 16)
    q = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="block_tables"):  # a block id past the pool: never read out of bounds
        ragged_paged_attention(kernel, q, k, k, torch.tensor([[5]]), torch.tensor([3]), torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match="block_tables"):  # a context longer than the table
        ragged_paged_attention(kernel, q, k, k, torch.tensor([[0]]), torch.tensor([17]), torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match="query_start_loc"):
        ragged_paged_attention(kernel, q, k, k, torch.tensor([[0]]), torch.tensor([3]), torch.tensor([0, 2]), 0.1)
    with pytest.raises(ValueError, match="cpu"):
        select_backend("cpu", "cuda")


def test_a_model_on_the_cpu_backend_deep_copies_and_shares_it():
    """Training checkpoints deep-copy the model; the backend holds the kernel's module, which cannot be copied."""
    backend = CpuBackend()
    model = torch.nn.Linear(2, 2)
    model.backend = backend
    clone = copy.deepcopy(model)
    assert clone.backend is backend and clone.weight is not model.weight


def test_without_a_compiler_auto_falls_back_to_the_references(tmp_path, monkeypatch):
    """No build in ZEROC_KERNEL_DIR and no compiler: `auto` serves with the PyTorch references, `cpu` is a clear
    ValueError."""
    monkeypatch.setenv("ZEROC_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert load_ragged_kernel() is None
    assert select_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="could not be built"):
        select_backend("cpu", "cpu")


def test_fp32_and_bf16_pools_go_to_the_kernel_as_they_lie_and_fp16_as_copies_of_the_named_blocks():
    from zeroc_kernels.ragged_cpu import _kernel_pools

    tables = torch.tensor([[3, 1], [1, 0]])
    for dtype in (torch.float32, torch.bfloat16):
        k, v = torch.randn(5, 16, 2, 8).to(dtype), torch.randn(5, 16, 2, 8).to(dtype)
        assert all(a is b for a, b in zip(_kernel_pools(k, v, tables), (k, v, tables)))  # read in place
    k, v = torch.randn(5, 16, 2, 8).half(), torch.randn(5, 16, 2, 8).half()
    k32, v32, renumbered = _kernel_pools(k, v, tables)
    assert k32.dtype == torch.float32 and k32.shape[0] == 3  # blocks 0, 1 and 3 only
    assert torch.equal(k32[renumbered], k[tables].float()) and torch.equal(v32[renumbered], v[tables].float())
