"""The cpu backend's C++ RMSNorm and RoPE (kernels/cpu_layer_ops.py, csrc/layer_ops.cpp) against their references:
RoPE bit for bit, the norms to the last bit of a sum's order, on rows read in place (a fused projection's slices)
and across threads; and the references for what the kernel declines."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zeroc.rope import rope_cos_sin
from zeroc_kernels.cpu_layer_ops import cpu_add_rms_norm, cpu_apply_rope, cpu_rms_norm
from zeroc_kernels.layer_ops import add_rms_norm_ref, rms_norm_ref
from zeroc_kernels.qkv_epilogue import apply_rope_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# a sum of squares in another order may tip the normalised value's rounding by one ulp, which the weight's
# product can turn into two: two ulps of the dtype
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def _strided_rows(gen, rows, hidden, dtype):
    # [rows, hidden] as a slice of a wider buffer: a fused GEMM's output split, rows not contiguous
    wide = (torch.randn(rows, hidden + 24, generator=gen) * torch.rand(rows, 1, generator=gen) * 8).to(dtype)
    return wide[:, 16: 16 + hidden]


@torch.inference_mode()
@settings(max_examples=16, deadline=None)
@given(rows=st.integers(1, 300), hidden=st.sampled_from([8, 96, 100, 384, 576]), dtype=st.sampled_from(DTYPES),
       num_threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
@example(rows=300, hidden=576, dtype=torch.bfloat16, num_threads=2, seed=1)
def test_the_norms_match_the_references(cpu_kernel, rows, hidden, dtype, num_threads, seed):
    """Up to 300 rows of 576: enough work for two threads, each row's result the same on either (the suite's
    autouse fixture restores the thread count)."""
    torch.set_num_threads(num_threads)
    gen = torch.Generator().manual_seed(seed)
    x, residual = _strided_rows(gen, rows, hidden, dtype), (torch.randn(rows, hidden, generator=gen) * 4).to(dtype)
    weight = (1 + torch.randn(hidden, generator=gen) / 4).to(dtype)
    out, total = cpu_add_rms_norm(cpu_kernel, x, residual, weight, 1e-5)
    want_out, want_total = add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(total, want_total)  # the residual stream, exactly as torch's add rounds it
    tol = NORM_TOL[dtype]
    torch.testing.assert_close(out, want_out, atol=tol, rtol=tol)
    alone = cpu_rms_norm(cpu_kernel, x, weight, 1e-5)
    assert alone.dtype == dtype and alone.shape == x.shape
    torch.testing.assert_close(alone, rms_norm_ref(x, weight, 1e-5), atol=tol, rtol=tol)
    torch.set_num_threads(3 - num_threads)
    assert torch.equal(cpu_rms_norm(cpu_kernel, x, weight, 1e-5), alone)  # rows are whole on one thread


@torch.inference_mode()
@settings(max_examples=16, deadline=None)
@given(lead=st.sampled_from([(1,), (7,), (3, 5), (260,)]), heads=st.sampled_from([1, 4, 6]),
       table_heads=st.sampled_from(["one", "each"]), d=st.sampled_from([2, 16, 40, 64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(lead=(260,), heads=6, table_heads="each", d=64, dtype=torch.float32, seed=1)
def test_rope_gives_the_references_bits(cpu_kernel, lead, heads, table_heads, d, dtype, seed):
    """Query heads over one table row or one each (per-KV-head pairs repeated for the group), q read in place from
    a fused projection's output: the same roundings in the same order, so the same bits; on two threads where the
    rows are many."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(*lead, heads * d + 2 * d, generator=gen).to(dtype)
    x = fused[..., : heads * d].view(*lead, heads, d)
    rows = 1 if table_heads == "one" else heads
    positions = torch.randint(0, 4096, lead, generator=gen)
    cos, sin = rope_cos_sin(torch.rand(rows, d // 2, generator=gen), positions, dtype)
    got = cpu_apply_rope(cpu_kernel, x, cos, sin)
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, apply_rope_ref(x, cos, sin))


def test_what_the_kernel_declines_goes_to_the_references(cpu_kernel):
    """Inputs that need a gradient (the kernel records no graph), other dtypes, mixed dtypes and tables that
    broadcast over more than heads: the references' results, gradients included."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 16, generator=gen), torch.nn.Parameter(torch.rand(16, generator=gen))
    out = cpu_rms_norm(cpu_kernel, x, weight, 1e-5)
    assert out.grad_fn is not None
    out.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    assert cpu_kernel.rms_norm(x.double(), weight.detach().double(), 1e-5) is None
    assert cpu_kernel.add_rms_norm(x, x.bfloat16(), weight.detach(), 1e-5) is None
    torch.testing.assert_close(cpu_rms_norm(cpu_kernel, x.double(), weight.detach().double(), 1e-5),
                               rms_norm_ref(x.double(), weight.detach().double(), 1e-5))
    q = torch.randn(2, 5, 4, 8, generator=gen)  # [B, T, heads, d] against tables for [T] only
    cos, sin = rope_cos_sin(torch.rand(1, 4, generator=gen), torch.arange(5), torch.float32)
    assert cpu_kernel.apply_rope(q, cos, sin) is None
    assert torch.equal(cpu_apply_rope(cpu_kernel, q, cos, sin), apply_rope_ref(q, cos, sin))
