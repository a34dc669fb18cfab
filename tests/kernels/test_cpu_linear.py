"""The cpu backend's packed oneDNN GEMMs (kernels/cpu_linear.py): F.linear's results, one pack reused, and a pack
that never outlives the weight it was made from (in-place writes, `.data =`, a new Parameter, moves and casts)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from model_copies import unfused_copy
from zeroc.layers import Linear
from zeroc_kernels.attention import CpuBackend, TorchBackend
from zeroc_kernels.cpu_linear import ONEDNN_MIN_WEIGHT, ONEDNN_PACK, PACKED_DTYPES, WeightPack, onednn_linear

# A torch build without oneDNN (torch.ops.mkldnn._reorder_linear_weight) packs nothing: the cpu backend then runs
# F.linear, which tests/kernels/test_attention.py::test_linear_is_f_linear covers on every backend. CI's x86 wheel
# has it, so these run there.
pytestmark = pytest.mark.skipif(not ONEDNN_PACK, reason="this torch build has no oneDNN weight reorder "
                                "(torch.ops.mkldnn._reorder_linear_weight), so nothing packs; F.linear serves")
BIG = (1024, 384)  # [out, in]: the bundled model's gate, over ONEDNN_MIN_WEIGHT
SMALL = (384, 384)  # its q_proj, under it


def _close(a, b):
    if a.dtype == torch.bfloat16:  # against fp32 on the same bf16 inputs: the output's rounding, 2^-8 relative
        a, b = a.float(), b.float()
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def _reference(x, w, bias=None):
    """F.linear in fp32 on the same values (a bf16 GEMM's oracle), cast back to x's dtype"""
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("m", [1, 4, 33, 256])
def test_packed_gemm_is_f_linear_and_packs_once(m, dtype):
    gen = torch.Generator().manual_seed(m)
    w, b = torch.randn(*BIG, generator=gen).to(dtype), torch.randn(BIG[0], generator=gen).to(dtype)
    x = torch.randn(m, BIG[1], generator=gen).to(dtype)
    pack = WeightPack()
    for bias in (None, b):
        _close(onednn_linear(x, w, bias, pack), _reference(x, w, bias))
    packed = pack.packed
    assert packed is not None and packed.is_mkldnn
    x3 = torch.randn(3, BIG[1], 2 * m, generator=gen).to(dtype).transpose(1, 2)  # [3, 2m, in], not contiguous
    _close(onednn_linear(x3, w, b, pack), _reference(x3, w, b))
    assert pack.packed is packed  # the same weight: packed once


@torch.no_grad()
def test_a_changed_weight_is_packed_again():
    gen = torch.Generator().manual_seed(0)
    lin = Linear(BIG[1], BIG[0], bias=False)
    lin.gemm = CpuBackend().linear
    x = torch.randn(4, BIG[1], generator=gen)
    _close(lin(x), F.linear(x, lin.weight))
    first = lin.pack.packed
    lin.weight.mul_(-2.0)  # in place: the version counter moves
    _close(lin(x), F.linear(x, lin.weight))
    assert lin.pack.packed is not first
    lin.weight.data = torch.randn(*BIG, generator=gen)  # new storage under the same Parameter
    _close(lin(x), F.linear(x, lin.weight))
    lin.weight = torch.nn.Parameter(torch.randn(*BIG, generator=gen))  # a new Parameter
    _close(lin(x), F.linear(x, lin.weight))
    lin.weight.data = lin.weight.data.t().contiguous().t()  # same values, other strides
    _close(lin(x), F.linear(x, lin.weight))


@torch.no_grad()
def test_moves_casts_copies_and_backends_start_from_an_empty_pack():
    gen = torch.Generator().manual_seed(1)
    lin = Linear(BIG[1], BIG[0])
    lin.gemm = CpuBackend().linear
    x = torch.randn(5, BIG[1], generator=gen)
    want = F.linear(x, lin.weight, lin.bias)
    _close(lin(x), want)
    assert pickle.loads(pickle.dumps(lin.pack)).packed is None  # the backend's kernel module does not pickle
    other = copy.deepcopy(lin)
    assert other.pack.packed is None and other.pack is not lin.pack
    _close(other(x), want)
    assert other.pack.packed is not None
    lin.half()  # a cast: the fp32 pack is dropped, and fp16 (which never packs) runs F.linear
    assert lin.pack.packed is None
    assert torch.equal(lin(x.half()), F.linear(x.half(), lin.weight, lin.bias))
    assert lin.pack.packed is None
    lin.bfloat16()  # bf16 packs where oneDNN runs it (PACKED_DTYPES)
    _close(lin(x.bfloat16()), _reference(x.bfloat16(), lin.weight, lin.bias))
    assert (lin.pack.packed is not None) == (torch.bfloat16 in PACKED_DTYPES)
    lin.float()
    _close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert lin.pack.packed is not None


@torch.no_grad()
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("shape", [BIG, SMALL, (128, 384), (384, 1024), (8192, 384)])  # the bundled model's
@pytest.mark.parametrize("threads", [1, 2])  # a service's engine runs either, step by step (zeroc/cpu_threads.py)
def test_a_packed_gemm_gives_a_row_the_same_bits_at_any_batch(shape, dtype, threads):
    # what keeps a request's logits independent of its step's batch, and the served prompt equal to the streaming
    # evaluator's token-at-a-time run (F.linear, which small weights took before, is not: test_kivi.py moved 2e-3).
    # From 2,048 inputs up a lone row takes another oneDNN kernel (the module docstring): not claimed there.
    torch.set_num_threads(threads)  # restored after the test (conftest.py)
    gen = torch.Generator().manual_seed(shape[0])
    w, b = torch.randn(*shape, generator=gen).to(dtype), torch.randn(shape[0], generator=gen).to(dtype)
    x, pack = torch.randn(70, shape[1], generator=gen).to(dtype), WeightPack()
    full = onednn_linear(x, w, b, pack)
    for m in (1, 2, 3, 4, 16, 33, 64):
        assert torch.equal(onednn_linear(x[:m], w, b, pack), full[:m]), m
    assert torch.equal(onednn_linear(x[40:41], w, b, pack), full[40:41])


@torch.no_grad()
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_a_released_pack_is_the_weights_only_copy_and_restores_it_exactly(dtype):
    """Released, the weight's data is an empty placeholder and the GEMMs give the bits they gave before; restored,
    the weight is the same bits, and the pack stays (not packed again)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(*BIG, generator=gen).to(dtype), requires_grad=False)
    b, x = torch.randn(BIG[0], generator=gen).to(dtype), torch.randn(7, BIG[1], generator=gen).to(dtype)
    original, pack = w.detach().clone(), WeightPack()
    assert not pack.release(w)  # nothing packed yet: nothing released
    want = onednn_linear(x, w, b, pack)
    packed = pack.packed
    assert pack.release(w) and pack.released and w.numel() == 0 and w.dtype == dtype
    assert not pack.release(w)  # once
    assert torch.equal(onednn_linear(x, w, b, pack), want)
    assert torch.equal(onednn_linear(x[3:4], w, b, pack), want[3:4])
    with pytest.raises(RuntimeError, match="restore it"):
        pack.clear()  # the only copy is never dropped
    pack.restore(w)
    assert not pack.released and torch.equal(w, original)
    assert torch.equal(onednn_linear(x, w, b, pack), want) and pack.packed is packed
    w.add_(1.0)
    assert not pack.release(w)  # a stale pack is no copy of the weight
    assert w.numel() == original.numel()


def test_a_released_gemm_refuses_what_only_the_plain_weight_could_run():
    w, pack = torch.nn.Parameter(torch.randn(*BIG)), WeightPack()
    with torch.no_grad():
        onednn_linear(torch.randn(2, BIG[1]), w, None, pack)
        pack.release(w)
    with pytest.raises(RuntimeError, match="released for serving.*with gradients"):
        onednn_linear(torch.randn(2, BIG[1]), w, None, pack)
    with torch.no_grad(), pytest.raises(RuntimeError, match="released for serving.*torch.float64 inputs"):
        onednn_linear(torch.randn(2, BIG[1], dtype=torch.float64), w, None, pack)


@torch.no_grad()
def test_a_released_pack_is_copied_and_pickled_with_its_weight():
    """Nothing else holds the weight, so a copy or a pickle of a released pack carries it (an unreleased one starts
    empty)."""
    w, x = torch.randn(*BIG), torch.randn(3, BIG[1])
    pack = WeightPack()
    want = onednn_linear(x, w, None, pack)
    assert copy.deepcopy(pack).packed is None and pickle.loads(pickle.dumps(pack)).packed is None
    pack.release(w)
    for twin in (copy.deepcopy(pack), pickle.loads(pickle.dumps(pack))):
        assert twin.released and twin.packed is not pack.packed
        assert torch.equal(onednn_linear(x, w, None, twin), want)


def test_what_is_never_packed():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, BIG[1], generator=gen)
    pack = WeightPack()
    with torch.no_grad():
        small = torch.randn(*SMALL, generator=gen)
        assert small.numel() < ONEDNN_MIN_WEIGHT
        assert torch.equal(onednn_linear(x, small), F.linear(x, small))  # no slot, a small weight: F.linear
        big = torch.randn(*BIG, generator=gen)
        assert torch.equal(TorchBackend().linear(x, big, None, pack), F.linear(x, big))  # it ignores the slot
        assert pack.packed is None
        assert torch.equal(onednn_linear(x.half(), big.half(), None, pack), F.linear(x.half(), big.half()))
        assert pack.packed is None  # fp16 never packs
        onednn_linear(x.bfloat16(), big.bfloat16(), None, pack)  # bf16 does, where oneDNN has bf16 kernels
        assert (pack.packed is not None) == (torch.bfloat16 in PACKED_DTYPES)
        pack.clear()
    w = torch.randn(*BIG, generator=gen)
    with torch.inference_mode():  # an inference tensor has no version counter: packed at each call, nothing kept
        w_inference = w.clone()
        got = onednn_linear(x, w_inference, None, pack)
        assert pack.packed is None
        assert torch.equal(got, onednn_linear(x, w, None, WeightPack()))  # the bits of a weight packed once
    w = torch.randn(*BIG, generator=gen, requires_grad=True)  # gradients wanted: F.linear itself
    out = onednn_linear(x, w, None, pack)
    assert torch.equal(out, F.linear(x, w)) and pack.packed is None
    out.sum().backward()
    assert w.grad is not None


def test_a_model_packs_every_weight_and_a_new_backend_drops_the_packs(random_gqa, cpu_kernel):
    model = unfused_copy(random_gqa.model)  # outside inference_mode, where a copy's weights would not pack
    with torch.inference_mode():  # as the engine runs
        _forward_packs_and_backends_unpack(model)


def _forward_packs_and_backends_unpack(model):
    tokens = torch.randint(2, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    model.backend = TorchBackend()
    want = model(tokens)  # F.linear, nothing packed
    assert all(lin.pack.packed is None for lin in model.modules() if isinstance(lin, Linear))
    model.backend = CpuBackend()
    _close(model(tokens), want)
    linears = [lin for lin in model.modules() if isinstance(lin, Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1  # q, k, v, o, gate, up, down; the LM head
    assert all(lin.pack.packed is not None for lin in linears)
    model.backend = TorchBackend()
    assert all(lin.pack.packed is None for lin in linears)


def test_an_engine_packs_before_it_sizes_its_cache_and_skips_the_fused_parts(random_gqa, cpu_kernel):
    from zeroc.engine import Engine

    loaded = copy.deepcopy(random_gqa)
    loaded.model.backend = CpuBackend()
    Engine(loaded)  # fuses Q/K/V and gate/up on the cpu backend, then packs: no forward has run
    model = loaded.model
    fused = [f for layer in model.model.layers for f in (layer.self_attn.qkv, layer.mlp.gate_up)]
    parts = {id(p) for f in fused for p in f.parts}
    assert all(f.pack.packed is not None for f in fused)
    for lin in (m for m in model.modules() if isinstance(m, Linear)):
        assert (lin.pack.packed is None) == (id(lin) in parts)  # o_proj, down and the LM head packed; parts not
    loaded.model.backend = CpuBackend(pack_weights=False)  # a backend that does not pack: every slot emptied
    Engine(loaded)
    assert all(f.pack.packed is None for f in fused)
    assert all(m.pack.packed is None for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_decode_rows_logits_are_the_same_bits_alone_and_in_a_batch(random_gqa, cpu_kernel, dtype, threads):
    """On the cpu backend a sequence's decode step gives the same logits whatever else its step batches: the packed
    GEMMs, the fused ones included, and the ragged kernel's per-sequence attention are batch-invariant, on one
    intra-op thread and on two."""
    torch.set_num_threads(threads)  # restored after the test (conftest.py)
    from zeroc.caches import paged_cache
    from zeroc.config import CacheConfig
    from zeroc.kv_cache import layer_shapes

    model = copy.deepcopy(random_gqa.model).to(dtype)
    model.backend = CpuBackend()
    model.fuse_projections()  # again, after the cast
    assert all(layer.self_attn.qkv.fresh and layer.mlp.gate_up.fresh for layer in model.model.layers)
    gen = torch.Generator().manual_seed(0)
    prompts = {s: torch.randint(2, 500, (n,), generator=gen) for s, n in (("a", 40), ("b", 75), ("c", 13), ("d", 90))}

    def decode(names: list[str]) -> torch.Tensor:
        cache = paged_cache(layer_shapes(model.config), CacheConfig(16, 64), dtype, model=model)
        with torch.inference_mode():
            for s in names:  # each prompt alone
                batch = cache.schedule([(s, len(prompts[s]))])
                model.forward_paged(prompts[s], batch.positions, batch, cache)
            batch = cache.schedule([(s, 1) for s in names])  # then one decode step of all of them
            return model.forward_paged(torch.full((len(names),), 7), batch.positions, batch, cache)

    alone, batched = decode(["a"]), decode(["b", "a", "c", "d"])
    assert torch.equal(alone[0], batched[1])


@torch.no_grad()
@pytest.mark.parametrize("m", [16, 70])
def test_widened_bf16_gemms_round_the_fp32_product_once(m, monkeypatch):
    """bf16 GEMMs of many rows where bf16 does not pack (AVX2: driven on any CPU by taking bf16 out of
    PACKED_DTYPES): the fp32 product of the same values, slice by slice of the weight (a slice smaller than the
    weight here, and one that does not divide it), rounded once to bf16; fewer rows stay on F.linear."""
    import zeroc_kernels.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "PACKED_DTYPES", (torch.float32,))
    monkeypatch.setattr(cpu_linear, "WIDEN_SLICE", 100 * BIG[1])  # slices of 100 output features: 11 for 1,024
    gen = torch.Generator().manual_seed(m)
    w, b = torch.randn(*BIG, generator=gen).bfloat16(), torch.randn(BIG[0], generator=gen).bfloat16()
    x = torch.randn(2, m // 2, BIG[1], generator=gen).bfloat16()  # [2, m/2, in]: rows over two leading dims
    for bias in (None, b):
        got = onednn_linear(x, w, bias, WeightPack())
        assert got.dtype == torch.bfloat16 and got.shape == (2, m // 2, BIG[0])
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        # one rounding of an fp32 product that may differ from this one in its last bits: within a bf16 ulp
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)
    few = x[:1, :3]  # 3 rows: F.linear's bf16 GEMM, as before
    assert torch.equal(onednn_linear(few, w, b, WeightPack()), F.linear(few, w, b))
