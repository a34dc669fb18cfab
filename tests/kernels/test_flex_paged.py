"""FlexAttention over the paged cache (kernels/flex_paged.py) against `paged_attention_ref`: eager (torch's math
path, which applies the mask to every slot of the pool) and compiled (the fused kernel, which reads only the pages
the block mask lists), decode steps, prompts from scratch and after a cached prefix, mixed steps, GQA, unequal
q/k and v widths, prefix-shared pages, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from zeroc_kernels.attention import FlexBackend, select_backend
from zeroc_kernels import flex_paged
from zeroc_kernels.flex_paged import (PREFILL_Q_BLOCK, compiled_flex, flex_paged_attention, logical_pages,
                                      page_tails, zero_page_tails)
from zeroc_kernels.paged_attention import paged_attention_ref

# (context lengths, new tokens) per sequence: a decode step (page ends, one token, off a page), prompts from scratch
# with a tile boundary inside one, a prompt after a cached prefix beside decode rows.
CASES = {
    "decode": ([1, 16, 17, 40, 97], [1, 1, 1, 1, 1]),
    "prompts": ([5, PREFILL_Q_BLOCK + 9, 33], [5, PREFILL_Q_BLOCK + 9, 33]),
    "mixed": ([150, 20, 64, 3], [70, 1, 1, 3]),
}


def _case(name, dq, dv, dtype, poison, random_paged_kv, poison_unused_slots, seed=0, group=3):
    """A step of CASES[name] in a pool of 2 KV heads, sequence 1 sharing sequence 0's first page where both
    have it in their cached prefix. -> (flex_paged_attention's arguments but scale, reference output)"""
    gen = torch.Generator().manual_seed(seed)
    lens, new = CASES[name]
    k_cache, v_cache, tables = random_paged_kv(gen, lens, 16, 2, dq, dv, dtype)
    if lens[0] - new[0] >= 16 and lens[1] - new[1] >= 16:
        tables[1, 0] = tables[0, 0]
    seq_lens = torch.tensor(lens)
    if poison:  # NaN in every slot outside the contexts: unowned pages and each last page's tail
        k_cache, v_cache = (poison_unused_slots(c, tables, seq_lens) for c in (k_cache, v_cache))
    starts = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist())
    q = torch.randn(sum(new), 2 * group, dq, generator=gen).to(dtype)
    args = (q, k_cache, v_cache, tables, seq_lens, starts)
    return args, paged_attention_ref(*args, 0.125)


def _close(out, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dims", [(32, 32), (24, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_flex_equals_the_reference(random_paged_kv, poison_unused_slots, name, dims, dtype):
    # Eager FlexAttention weighs every slot of the pool, so this pool holds no NaN: the mask alone must be exact.
    args, ref = _case(name, *dims, dtype, False, random_paged_kv, poison_unused_slots)
    _close(flex_paged_attention(*args, 0.125), ref, dtype)
    _close(flex_paged_attention(*args, 0.125, max_q=max(CASES[name][1])), ref, dtype)


@pytest.fixture(scope="module")
def compiled():
    return compiled_flex(dynamic=False)


@pytest.mark.parametrize("name, dtype", [("decode", torch.float32), ("mixed", torch.float32),
                                         ("prompts", torch.bfloat16)])
def test_compiled_flex_reads_only_the_sequences_pages(random_paged_kv, poison_unused_slots, compiled, name, dtype):
    # NaN in every slot outside the contexts: a block list naming a page the sequence does not hold, or a last
    # page's tail left stale, turns the output NaN (a masked key's weight is 0, and 0 * NaN is NaN).
    args, ref = _case(name, 24, 40, dtype, True, random_paged_kv, poison_unused_slots, seed=1)
    _close(flex_paged_attention(*args, 0.125, attend=compiled), ref, dtype)


def test_zero_page_tails_zeroes_only_the_slots_past_each_context():
    v_cache = torch.randn(6, 4, 2, 3)
    before = v_cache.clone()
    tables = torch.tensor([[5, 2, 0], [1, 0, 0], [3, 4, 0]])  # zeros past a sequence's pages are padding
    zero_page_tails(v_cache, *page_tails(tables, torch.tensor([6, 4, 7]), 4))
    stale = torch.zeros(6, 4, dtype=torch.bool)
    stale[2, 2:] = True  # 6 tokens: page 2 holds positions 4, 5
    stale[4, 3:] = True  # 7 tokens: page 4 holds positions 4-6; sequence 1's page 1 is full
    assert (v_cache[stale] == 0).all()
    assert torch.equal(v_cache[~stale], before[~stale])


def test_logical_pages_give_each_page_its_index_in_the_tables_that_hold_it():
    tables = torch.tensor([[7, 2, 9, 0], [7, 5, 0, 0]])  # 7 is a shared first page; zeros past the pages are padding
    logical = logical_pages(tables, torch.tensor([3, 2]), 10)
    assert logical.dtype == torch.int32
    assert logical[[7, 2, 9, 5]].tolist() == [0, 1, 2, 1]
    assert logical[0] == 0  # held by no one: its table entry check fails in the mask


@pytest.mark.parametrize("name", ["triton", "flex"])
def test_the_triton_backends_refuse_the_cpu_outside_the_interpreter(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=f"the {name} attention backend cannot run on cpu"):
        select_backend(name, "cpu")


def test_the_flex_backend_compiles_static_shapes_on_the_cpu(monkeypatch):
    # torch 2.13's CPU lowering builds no C++ for a prompt's dynamic shapes (the docstring of FlexBackend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = select_backend("flex", "cpu")
    assert isinstance(backend, FlexBackend) and backend.fused_epilogue and not backend.dynamic


def test_a_column_view_of_a_pool_is_read_in_place(random_paged_kv, compiled):
    # A run of a per-KV-head-rank layer attends through a column view of its pool (rows wider than the view's heads)
    gen = torch.Generator().manual_seed(2)
    lens = [40, 20, 70]
    k_cache, v_cache, tables = random_paged_kv(gen, lens, 16, 4, 48, 48, torch.float32)
    k_view, v_view = k_cache[:, :, :2, :32], v_cache[:, :, :2, :24]
    args = (torch.randn(3, 6, 32, generator=gen), k_view, v_view, tables, torch.tensor(lens), torch.arange(4))
    ref = paged_attention_ref(*args, 0.125)
    _close(flex_paged_attention(*args, 0.125, attend=compiled), ref, torch.float32)


def test_past_its_compile_limit_the_flex_backend_attends_by_the_triton_kernels(monkeypatch, caplog, random_paged_kv,
                                                                               poison_unused_slots):
    # Past dynamo's limit a compiled flex_attention would quietly run eager (every pool slot weighed: NaN here)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(flex_paged, "RECOMPILE_LIMIT", 0)
    backend = select_backend("flex", "cpu")
    args, ref = _case("mixed", 32, 32, torch.float32, True, random_paged_kv, poison_unused_slots, seed=3)
    for _ in range(2):
        _close(backend.paged_attention(*args, 0.125, max_q=max(CASES["mixed"][1])), ref, torch.float32)
    assert not backend.flex
    assert [r.message for r in caplog.records].count("flex backend: 0 step shapes compiled; the Triton kernels attend "
                                                     "from here on") == 1


@pytest.mark.parametrize("name", ["decode", "mixed"])
def test_one_plan_serves_every_layer_of_its_step(monkeypatch, random_paged_kv, poison_unused_slots, name):
    # Two layers' pools, one step's batch tensors, the backend's plan built once: both layers exact over pools
    # poisoned outside the contexts (a block mask or tail slots of other tables would read a NaN).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = select_backend("flex", "cpu")
    max_q = max(CASES[name][1])
    args, _ = _case(name, 32, 32, torch.float32, True, random_paged_kv, poison_unused_slots, seed=4)
    q, k_cache, v_cache, tables, seq_lens, starts = args
    plan = backend.plan(tables, seq_lens, starts, q.shape[0], k_cache.shape[1], k_cache.shape[0], max_q)
    assert plan.decode == (name == "decode")
    for layer in (args, (q, k_cache * -0.5, v_cache * 2, tables, seq_lens, starts)):
        _close(backend.paged_attention(*layer, 0.125, max_q=max_q, plan=plan), paged_attention_ref(*layer, 0.125),
               torch.float32)
