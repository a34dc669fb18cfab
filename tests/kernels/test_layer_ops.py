"""The fused norm and gate kernels against their references (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroc_kernels.attention import TorchBackend, TritonBackend
from zeroc_kernels.layer_ops import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref, silu_mul, silu_mul_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 70), hidden=st.sampled_from([8, 96, 100, 256, 576]), dtype=st.sampled_from(DTYPES),
       weight_fp32=st.booleans(), seed=st.integers(0, 2**16))
def test_rms_norm_matches_the_reference(rows, hidden, dtype, weight_fp32, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * torch.rand(rows, 1, generator=gen) * 8).to(dtype)
    weight = (1 + torch.randn(hidden, generator=gen) / 4).to(torch.float32 if weight_fp32 else dtype)
    want = rms_norm_ref(x, weight, 1e-5)
    out = torch.full(x.shape, float("nan"), dtype=want.dtype)  # poisoned: every element must be written
    got = rms_norm(x, weight, 1e-5, out=out)
    assert got is out and got.dtype == want.dtype
    # The same roundings in the same places. A sum in another order may tip the normalised value's rounding by
    # one ulp, which the weight's product can turn into two: the tolerance is two ulps of the dtype.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 70), hidden=st.sampled_from([8, 96, 100, 576]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_add_rms_norm_matches_the_reference(rows, hidden, dtype, seed):
    """The residual add and the norm after it, in one kernel: the sum exactly as a torch add rounds it (the
    next layer adds to it), the norm as rms_norm's, of that rounded sum."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 4).to(dtype)
    residual = (torch.randn(rows, hidden, generator=gen) * 8).to(dtype)
    weight = (1 + torch.randn(hidden, generator=gen) / 4).to(dtype)
    want, want_sum = add_rms_norm_ref(x, residual, weight, 1e-5)
    out = torch.full(x.shape, float("nan"), dtype=want.dtype)  # poisoned: every element must be written
    got, got_sum = add_rms_norm(x, residual, weight, 1e-5, out=out)
    assert got is out and got_sum.dtype == dtype
    if dtype == torch.bfloat16:  # Triton's interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest,
        # as torch does): one ulp at most, here only
        ulp = 2.0 ** (torch.frexp(want_sum.float()).exponent.float() - 8)
        assert ((got_sum.float() - want_sum.float()).abs() <= ulp).all()
    else:
        torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dtype]
    # the norm of the sum the kernel stored (in bf16 under the interpreter, an ulp off the reference's sum)
    torch.testing.assert_close(got, rms_norm_ref(got_sum, weight, 1e-5), atol=tol, rtol=tol)


def test_add_rms_norm_reads_strided_rows_and_rejects_mismatched_operands():
    x, residual = torch.randn(3, 5, 2 * 64)[..., :64], torch.randn(3, 5, 64)  # x's rows strided by 128
    w = torch.rand(64)
    for got, want in zip(add_rms_norm(x, residual, w, 1e-6), add_rms_norm_ref(x, residual, w, 1e-6)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="one shape and dtype"):
        add_rms_norm(x, residual.double(), w, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, residual, torch.ones(32), 1e-6)


def test_rms_norm_takes_any_leading_shape_and_a_strided_row_view():
    x = torch.randn(3, 5, 2 * 64)[..., :64]  # rows strided by 128, last dim dense
    w = torch.rand(64)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    assert rms_norm(torch.empty(0, 64), w, 1e-6).shape == (0, 64)


def test_an_all_zero_row_normalises_to_zero_not_nan():
    x = torch.zeros(2, 32)
    assert rms_norm(x, torch.ones(32), 1e-6).eq(0).all()


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(1, 7), (64, 352), (3, 2, 100), (1, 70000)]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_silu_mul_matches_the_reference(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(*shape, generator=gen) * 6).to(dtype), torch.randn(*shape, generator=gen).to(dtype)
    want = silu_mul_ref(gate, up)
    got = silu_mul(gate, up, out=torch.full(shape, float("nan"), dtype=dtype))
    # exp's last fp32 bit differs between libraries, which may tip silu's rounding: two ulps, as for the norm
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_silu_mul_reads_the_halves_of_one_gemm_output_in_place():
    both = torch.randn(2, 3, 2 * 40)  # [*, gate | up], as a fused gate/up projection returns it
    gate, up = both.split(40, -1)
    assert not gate.is_contiguous()
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_ref(gate, up))


@pytest.mark.parametrize("bad", ["weight", "wide", "out"])
def test_rms_norm_rejects_what_it_cannot_compute(bad):
    x = torch.randn(4, 32)
    with pytest.raises(ValueError):
        if bad == "weight":
            rms_norm(x, torch.ones(16), 1e-6)
        elif bad == "wide":
            rms_norm(torch.randn(1, 70000), torch.ones(70000), 1e-6)
        else:
            rms_norm(x, torch.ones(32), 1e-6, out=torch.empty(4, 32, dtype=torch.bfloat16))


def test_silu_mul_rejects_mismatched_operands():
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(torch.randn(2, 8), torch.randn(2, 9))


def test_the_triton_backend_keeps_autograd_where_a_forward_trains():
    """The kernels have no backward: with gradients wanted, the backend computes the references, whose
    gradients match the torch backend's."""
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.rand(32, requires_grad=True)
    grads = []
    for backend in (TorchBackend(), TritonBackend()):
        x.grad = w.grad = None
        normed, total = backend.add_rms_norm(backend.rms_norm(x, w, 1e-6), x, w, 1e-6)
        backend.silu_mul(normed, total).sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])
    with torch.no_grad():  # and without, the kernels
        torch.testing.assert_close(TritonBackend().rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
