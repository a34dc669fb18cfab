"""Q/K/V and gate/up as one GEMM each (zeroc/fused_linears.py, `Transformer.fuse_projections`): the same
outputs as the parts, no weight stored twice, and the parts' own results wherever the fusion cannot hold."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from model_copies import unfused_copy
from zeroc.config import BUNDLED_MODEL
from zeroc.engine import Engine
from zeroc.fused_linears import FusedLinears, SummedLinears
from zeroc.loader import load_model, save_model
from zeroc.layers import Linear
from zeroc.sampling import SamplingParams
from zeroc_kernels.attention import CpuBackend, select_backend


def _parts(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(16, 8, bias=bias), nn.Linear(16, 4, bias=bias), nn.Linear(16, 4, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_one_gemm_gives_each_parts_output_from_one_copy_of_the_weights(bias):
    parts = _parts(bias)
    x = torch.randn(3, 5, 16)
    with torch.inference_mode():
        want = [p(x) for p in parts]
    fused = FusedLinears.of(*parts)
    assert all(p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr() for p in parts)
    with torch.inference_mode():
        got = fused(x)
    assert [tuple(g.shape) for g in got] == [(3, 5, 8), (3, 5, 4), (3, 5, 4)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_weights_loaded_into_a_part_in_place_reach_the_gemm():
    parts = _parts(True)
    fused = FusedLinears.of(*parts)
    new = nn.Linear(16, 4, bias=True)
    parts[1].load_state_dict(new.state_dict())
    x = torch.randn(2, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x)[1], new(x))


def test_with_gradients_or_replaced_weights_each_part_runs_on_its_own():
    parts = _parts(False)
    fused = FusedLinears.of(*parts)
    x = torch.randn(2, 16)
    sum(o.sum() for o in fused(x)).backward()  # gradients wanted: the parts, whose weights get them
    assert all(p.weight.grad is not None for p in parts)
    for p in parts:
        p.to(torch.float64)  # a cast after fusing: the concatenation is stale, the parts are not
    with torch.inference_mode():
        got = fused(x.double())
    assert all(g.dtype == torch.float64 for g in got)
    torch.testing.assert_close(got[2], parts[2](x.double()))


@pytest.mark.parametrize("fuse, parts, match", [
    (FusedLinears.of, (nn.Linear(16, 4), nn.Linear(8, 4)), "one input width"),
    (FusedLinears.of, (nn.Linear(16, 4, bias=True), nn.Linear(16, 4, bias=False)), "bias"),
    (SummedLinears.of, (nn.Linear(16, 4), nn.Linear(16, 8)), "one output width"),
    (SummedLinears.of, (nn.Linear(16, 4, bias=True), nn.Linear(8, 4, bias=True)), "at most one bias"),
])
def test_parts_that_cannot_share_one_gemm_are_refused(fuse, parts, match):
    with pytest.raises(ValueError, match=match):
        fuse(*parts)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_an_engine_on_a_fusing_backend_fuses_and_keeps_the_logits(random_gqa, tmp_path, backend, request):
    """An Engine whose backend fuses projections (cpu: packed oneDNN GEMMs; triton) fuses its model; the torch
    backend's does not, where one wide MKL GEMM measured no faster. The logits stay the unfused model's (the engine
    tests then hold its tokens to transformers'), and the fused weights save and load like any others."""
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")  # built, or a skip without a compiler
    unfused = unfused_copy(random_gqa)
    unfused.model.backend = select_backend("torch", "cpu")
    Engine(unfused)
    assert all(layer.self_attn.qkv is None for layer in unfused.model.model.layers)
    loaded = unfused_copy(random_gqa)
    loaded.model.backend = select_backend(backend, "cpu")  # triton: its interpreter, as on CI
    tokens = torch.tensor([[5, 9, 13, 200, 31]])
    with torch.inference_mode():
        before = loaded.model(tokens)
        engine = Engine(loaded)
        assert all(layer.self_attn.qkv is not None and layer.mlp.gate_up is not None
                   for layer in loaded.model.model.layers)
        torch.testing.assert_close(loaded.model(tokens), before)
    out = engine.generate([tokens[0].tolist()], SamplingParams(max_new_tokens=4, ignore_eos=True))
    with torch.inference_mode():
        greedy = unfused.model(tokens)[0, -1].argmax().item()
    assert len(out[0].token_ids) == 4 and out[0].token_ids[0] == greedy
    saved = load_model(save_model(loaded.model, loaded.tokenizer, tmp_path / "m"))
    for (name, a), b in zip(saved.model.state_dict().items(), random_gqa.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_fused_gemm_is_the_parts_backend_gemm_on_a_pack_that_follows_loads(cpu_kernel):
    """Parts that are the model's Linears run the fused GEMM through their backend's `linear` (the cpu backend packs
    the concatenation for oneDNN); a load into a part, in place, reaches the GEMM through the pack's check."""
    torch.manual_seed(0)
    parts = tuple(Linear(384, n, bias=False) for n in (384, 128, 128))
    for p in parts:
        p.gemm = CpuBackend().linear
    fused = FusedLinears.of(*parts)
    x = torch.randn(3, 384)
    with torch.no_grad():
        for got, p in zip(fused(x), parts):
            torch.testing.assert_close(got, F.linear(x, p.weight), rtol=1e-5, atol=1e-4)
        assert fused.pack.packed is not None and all(p.pack.packed is None for p in parts)
        parts[1].load_state_dict(nn.Linear(384, 128, bias=False).state_dict())  # lands in the concatenation
        torch.testing.assert_close(fused(x)[1], F.linear(x, parts[1].weight), rtol=1e-5, atol=1e-4)


class _CountingLinears(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def _summed(bias_on: int | None, seed: int = 0):
    torch.manual_seed(seed)
    return tuple(nn.Linear(n, 8, bias=i == bias_on) for i, n in enumerate((12, 4, 6)))


@pytest.mark.parametrize("bias_on", [None, 0, 2])
def test_summed_linears_are_one_gemm_over_the_inputs_side_by_side(bias_on):
    parts = _summed(bias_on)
    xs = [torch.randn(3, 5, p.in_features) for p in parts]
    with torch.inference_mode():
        want = sum(p(x) for p, x in zip(parts, xs))
    fused = SummedLinears.of(*parts)
    assert all(p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr() for p in parts)
    assert fused.weight.shape == (8, 22) and not parts[1].weight.is_contiguous()  # column views, not copies
    with torch.inference_mode():
        got = fused(*xs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(sum(p(x) for p, x in zip(parts, xs)), want)  # each part still runs alone


def test_summed_linears_follow_loads_and_fall_back_where_the_gemm_cannot_hold():
    parts = _summed(0)
    fused = SummedLinears.of(*parts)
    new = nn.Linear(12, 8)
    parts[0].load_state_dict(new.state_dict())  # in place: weight and bias land in the concatenation
    xs = [torch.randn(2, p.in_features) for p in parts]
    with torch.inference_mode():
        torch.testing.assert_close(fused(*xs), new(xs[0]) + parts[1](xs[1]) + parts[2](xs[2]))
    fused(*xs).sum().backward()  # gradients wanted: the parts, whose weights get them
    assert all(p.weight.grad is not None for p in parts)
    parts[2].weight = nn.Parameter(torch.zeros(8, 6))  # replaced: the concatenation is stale, the parts are not
    with torch.inference_mode():
        torch.testing.assert_close(fused(*xs), new(xs[0]) + parts[1](xs[1]))


def test_a_tier_model_with_per_head_ranks_fuses_every_projection_and_keeps_its_outputs(zeroc_tier_dir, tmp_path):
    """Per-KV-head ranks and a token tier, fold and rotate layers: on the triton backend the Engine runs each
    layer's input projections (Q, K, V and the tier's) as one GEMM and the tier's two output projections as one;
    dense logits and greedy tokens stay those of the unfused model (an engine on the torch backend)."""
    fused = load_model(zeroc_tier_dir, attention_backend="triton")
    plain = load_model(zeroc_tier_dir, attention_backend="torch")
    tokens = torch.tensor([[5, 9, 13, 200, 31, 7, 64, 90, 11, 300, 42, 17]])  # past the tier's 2 + 8 rows
    with torch.inference_mode():
        want = plain.model(tokens)
    engine = Engine(fused)
    widths = [len(layer.self_attn.input_projections()) for layer in fused.model.model.layers]
    assert all(layer.self_attn.qkv is not None and layer.self_attn.o_tier is not None
               and len(layer.self_attn.qkv.parts) == w for layer, w in zip(fused.model.model.layers, widths))
    assert sorted(set(widths)) == [4, 6]  # rotate layers: Q, K, V, V's complement; fold: the dropped pairs' Q, K too
    with torch.inference_mode(), _CountingLinears() as count:
        torch.testing.assert_close(fused.model(tokens), want, rtol=1e-4, atol=1e-4)
    assert count.calls == 4 * len(widths) + 1  # a layer: QKV + tier, both O, gate/up, down; then the LM head
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got = engine.generate([tokens[0].tolist()], params)[0].token_ids
    unfused = Engine(plain)
    assert all(layer.self_attn.qkv is None and layer.self_attn.o_tier is None for layer in plain.model.model.layers)
    assert got == unfused.generate([tokens[0].tolist()], params)[0].token_ids
    saved = load_model(save_model(fused.model, fused.tokenizer, tmp_path / "m"))
    for (name, a), b in zip(saved.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name


def _fused_groups(model):
    return [f for layer in model.model.layers for f in (layer.self_attn.qkv, layer.self_attn.o_tier, layer.mlp.gate_up)
            if f is not None]


def test_a_deep_copy_of_a_fused_model_is_fused_and_holds_its_weights_once(zeroc_tier_dir):
    """A copy's parts are re-pointed at a concatenation of their own (nn.Parameter's deep copy clones each part
    apart): one GEMM per group, as in the original, the original's weights untouched and not shared."""
    loaded = load_model(zeroc_tier_dir, attention_backend="torch")
    tokens = torch.tensor([[5, 9, 13, 200, 31, 7, 64, 90, 11, 300, 42, 17]])
    with torch.inference_mode():
        want = loaded.model(tokens)
    loaded.model.fuse_projections()
    groups = _fused_groups(loaded.model)
    copied = copy.deepcopy(loaded.model)
    twins = _fused_groups(copied)
    assert len(twins) == len(groups) == 3 * loaded.config.num_hidden_layers  # a tier model: QKV, both O, gate/up
    for f, twin in zip(groups, twins):
        assert twin.fresh and type(twin) is type(f) and twin.weight.data_ptr() != f.weight.data_ptr()
        assert torch.equal(twin.weight, f.weight)
        assert all(p.weight.untyped_storage().data_ptr() == twin.weight.untyped_storage().data_ptr()
                   for p in twin.parts)  # views of the copy's concatenation: stored once
        assert {id(p) for p in twin.parts} <= {id(m) for m in copied.modules()}  # the copy's own modules
    with torch.inference_mode(), _CountingLinears() as count:
        torch.testing.assert_close(copied(tokens), want, rtol=1e-5, atol=1e-5)
    assert count.calls == 4 * loaded.config.num_hidden_layers + 1  # fused in the copy too
    assert all(f.fresh for f in groups)


def test_fuse_projections_fuses_a_cast_model_again():
    """A cast after fusing leaves each group stale (its parts run apart); fusing again makes it one GEMM in the new
    dtype, and the stale concatenation is let go."""
    model = unfused_copy(load_model(BUNDLED_MODEL, attention_backend="torch").model)
    tokens = torch.tensor([[5, 9, 13, 200, 31]])
    model.fuse_projections()
    model.to(torch.float64)
    assert not any(f.fresh for f in _fused_groups(model))
    with torch.inference_mode():
        want = model(tokens)  # the parts, apart, in float64
    model.fuse_projections()
    groups = _fused_groups(model)
    assert groups and all(f.fresh and f.weight.dtype == torch.float64 for f in groups)
    with torch.inference_mode(), _CountingLinears() as count:
        torch.testing.assert_close(model(tokens), want)
    assert count.calls == 4 * model.config.num_hidden_layers + 1  # a layer: QKV, O, gate/up, down; the LM head


def test_an_engine_built_under_inference_mode_leaves_weights_that_load_and_pack_once():
    """Fused under torch.inference_mode (an Engine built there), the concatenations and the parts' views of them stay
    weights, not inference tensors: the cpu backend keeps their packs (an inference tensor would be packed afresh at
    every GEMM), and the model's state dict loads into another model (calibration builds its cut models so)."""
    loaded = load_model(BUNDLED_MODEL, attention_backend="cpu")
    with torch.inference_mode():
        Engine(loaded)
    groups = _fused_groups(loaded.model)
    assert groups and not any(f.weight.is_inference() for f in groups)
    assert not any(p.is_inference() for p in loaded.model.parameters())
    assert all(f.pack.packed is not None for f in groups)  # prepacked: an inference tensor is not
    other = load_model(BUNDLED_MODEL, attention_backend="cpu").model
    other.load_state_dict(loaded.model.state_dict(), assign=True)
    tokens = torch.tensor([[5, 9, 13, 200, 31]])
    with torch.inference_mode():
        torch.testing.assert_close(other(tokens), loaded.model(tokens), atol=0, rtol=0)


def test_a_released_model_gives_weights_back_not_inference_tensors_under_inference_mode():
    """A served model's weights live in their packs (`release_weights`); read back under torch.inference_mode, they
    are weights another model loads, the same bits."""
    loaded = load_model(BUNDLED_MODEL, attention_backend="cpu")
    Engine(loaded, release_weights=True)
    assert loaded.model.model.layers[0].mlp.gate_proj.weight.numel() == 0  # released: a placeholder
    with torch.inference_mode():
        state = loaded.model.state_dict()
    assert not any(t.is_inference() for t in state.values())
    other = load_model(BUNDLED_MODEL, attention_backend="cpu").model
    other.load_state_dict(state, assign=True)
    tokens = torch.tensor([[5, 9, 13, 200, 31]])
    with torch.inference_mode():
        torch.testing.assert_close(other(tokens), loaded.model(tokens), atol=0, rtol=0)
