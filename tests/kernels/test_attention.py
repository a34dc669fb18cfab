"""Every attention backend that runs here, against the references: the fresh-prefill path (a batch whose every
sequence attends only its own new rows) equals paged attention over the same rows, and which backends take it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroc_kernels.attention import TorchBackend, select_backend, triton_runs_on
from zeroc_kernels.sdpa import dense_lse_ref, sdpa_lse
from zeroc_kernels.paged_attention import paged_attention_ref


def _backends() -> list[str]:
    names = ["torch", "torch-epilogue", "cpu"]
    return names + ["triton", "flex"] * triton_runs_on(torch.device("cpu"))


def _make(name: str):
    try:
        return select_backend(name, "cpu")
    except ValueError:
        if name != "cpu":  # only the cpu backend depends on the machine (a compiler); any other refusal is a failure
            raise
        pytest.skip("no C++ compiler here to build the cpu backend's kernel; tests/kernels/test_ragged_cpu.py checks "
                    "that `cpu` then refuses with a ValueError")


def _fresh_batch(random_paged_kv, poison_unused_slots, gen, lens, group, dq, dv, dtype, block_size=16):
    """Sequences of `lens` new tokens and no prefix in a paged pool (2 KV heads, NaN in every slot no sequence
    holds), and their rows read out of it. -> q, k rows, v rows, k_cache, v_cache, tables, seq_lens, starts"""
    k_cache, v_cache, tables = random_paged_kv(gen, lens, block_size, 2, dq, dv, dtype)
    k_cache, v_cache = (poison_unused_slots(c, tables, torch.tensor(lens)) for c in (k_cache, v_cache))
    seq = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    rows = tables[seq, pos // block_size], pos % block_size
    q = torch.randn(sum(lens), 2 * group, dq, generator=gen).to(dtype)
    starts = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return q, k_cache[rows], v_cache[rows], k_cache, v_cache, tables, torch.tensor(lens), starts


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("dims", [(64, 64), (48, 16), (16, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_prefill_equals_paged_attention_over_the_same_rows(random_paged_kv, poison_unused_slots, name, dims,
                                                                  dtype):
    backend = _make(name)
    gen = torch.Generator().manual_seed(sum(dims))
    lens = (37, 5, 70)
    batch = _fresh_batch(random_paged_kv, poison_unused_slots, gen, lens, 3, *dims, dtype)
    q, k, v, k_cache, v_cache, tables, seq_lens, starts = batch
    scale = 1 / math.sqrt(64)
    want = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, starts, scale)
    got = backend.fresh_prefill(q, k, v, lens, scale)
    assert got.shape == (sum(lens), 6, dims[1]) and got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    paged = backend.paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, scale, max_q=max(lens))
    torch.testing.assert_close(got.float(), paged.float(), **tol)


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("dims", [(64, 64), (48, 16), (13, 40), (264, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_partials_equal_the_causal_reference_with_its_lse(name, dims, dtype):
    """One sequence's causal attention with each query's log-sum-exp (a token tier's prompt merges it with its
    full-rank segment): widths padded to one, a multiple of 8; wider than FlashAttention-2's 256, the reference."""
    backend, gen = _make(name), torch.Generator().manual_seed(sum(dims))
    q = torch.randn(70, 6, dims[0], generator=gen).to(dtype)
    k = torch.randn(70, 2, dims[0], generator=gen).to(dtype)
    v = torch.randn(70, 2, dims[1], generator=gen).to(dtype)
    out, lse = backend.dense_partials(q, k, v, 0.2)
    want, want_lse = dense_lse_ref(q.float(), k.float(), v.float(), 0.2)
    assert out.shape == (70, 6, dims[1]) and out.dtype == dtype and lse.shape == (70, 6) and lse.dtype == torch.float32
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), want, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    torch.testing.assert_close(sdpa_lse(q, k, v, 0.2)[1], lse, **tol)


@pytest.mark.parametrize("name", _backends())
def test_which_batches_take_the_fresh_path(name):
    backend = _make(name)
    if isinstance(backend, TorchBackend) and name != "cpu":  # the references are the oracle: never
        assert backend.fresh_prefill_min_tokens is None
        assert not backend.attends_fresh(10**6)
        return
    floor = backend.fresh_prefill_min_tokens
    assert floor is not None and floor >= 1
    assert backend.attends_fresh(floor) and not backend.attends_fresh(floor - 1)
    assert not backend.attends_fresh(None)  # a batch that does not know its longest query


@pytest.mark.parametrize("name", _backends())
def test_tier_decode_equals_the_reference(tier_decode_case, name):
    """A token tier's full-rank decode segment and merge (kernels/tier_decode.py, whose tests hold the reference
    to attention worked by hand), unseen rows NaN."""
    from zeroc_kernels.tier_decode import tier_decode_ref

    args, _ = tier_decode_case(11, b=4, group=4)
    got = _make(name).tier_decode(*args)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, tier_decode_ref(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("key_start", [0, 3, 20])
def test_decode_partials_merge_to_paged_attention_over_the_keys_from_the_start(random_paged_kv, poison_unused_slots,
                                                                               name, key_start):
    """A token tier's compressed segment: each backend's unmerged decode partials, merged by LSE, equal the
    references' paged attention over the sequence's keys from `key_start` on (a copy of the pages without the
    first keys: an oracle that knows nothing of starts)."""
    from zeroc_kernels.paged_decode import merge_partials_ref

    backend = _make(name)
    gen = torch.Generator().manual_seed(key_start)
    lens = [key_start + n for n in (1, 17, 90)]
    k_cache, v_cache, tables = random_paged_kv(gen, lens, 16, 2, 48, 24, torch.float32)
    seq_lens = torch.tensor(lens)
    k_cache, v_cache = (poison_unused_slots(c, tables, seq_lens) for c in (k_cache, v_cache))
    q = torch.randn(3, 6, 48, generator=gen)
    parts, lses = backend.decode_partials(q, k_cache, v_cache, tables, seq_lens, 0.2, key_start)
    got = merge_partials_ref(parts, lses)[0]
    for b, n in enumerate(lens):
        rows = tables[b].repeat_interleave(16) * 16 + torch.arange(16).repeat(tables.shape[1])  # flat slots in order
        keys = k_cache.flatten(0, 1)[rows[key_start:n]]  # [n - start, kv, dq]: the keys from the start, as a cache
        vals = v_cache.flatten(0, 1)[rows[key_start:n]]
        want = paged_attention_ref(q[b: b + 1], keys[:, None], vals[:, None], torch.arange(n - key_start)[None],
                                   torch.tensor([n - key_start]), torch.tensor([0, 1]), 0.2)
        torch.testing.assert_close(got[b: b + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", _backends())
# the cpu backend's oneDNN path (a weight of 2^18 elements and more) and its F.linear one for small weights
@pytest.mark.parametrize("m, k, n", [(1, 384, 8192), (4, 512, 512), (64, 512, 160), (15, 5, 100)])
def test_linear_is_f_linear(name, m, k, n):
    """Every backend's GEMM (the cpu backend's through oneDNN) gives F.linear's result, with and without a bias and
    for 3-d, non-contiguous inputs; where gradients are wanted, or the dtype is not fp32, it is F.linear itself."""
    backend = _make(name)
    gen = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    with torch.no_grad():
        for bias in (None, b):
            torch.testing.assert_close(backend.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
        x3 = x.expand(2, m, k)  # [2, m, k], a stride of 0
        torch.testing.assert_close(backend.linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-4)
        assert torch.equal(backend.linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    wg = w.clone().requires_grad_()
    out = backend.linear(x, wg, b)
    assert torch.equal(out, F.linear(x, w, b))
    out.sum().backward()
    assert wg.grad is not None
