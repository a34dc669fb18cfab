"""A served model holds each GEMM's weight once (zeroc/model.py `Transformer.release_plain_weights`, called by
`prepare_to_serve` for an Engine or prefill worker with `release_weights`, as the services build them): on the cpu
backend the oneDNN pack becomes the only copy, the logits keep their bits, and
whatever reads the plain weights (another backend, a move or cast, state_dict, load_state_dict, a deep copy) gets
them back exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from zeroc.config import SchedulerConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.layers import Linear
from zeroc_kernels.attention import CpuBackend, TorchBackend
from zeroc_kernels.cpu_linear import ONEDNN_PACK

pytestmark = pytest.mark.skipif(not ONEDNN_PACK, reason="this torch build has no oneDNN weight reorder, so nothing "
                                "packs and nothing is released (tests/kernels/test_cpu_linear.py says more)")
TOKENS = torch.tensor([[5, 9, 13, 200, 31, 7, 64, 90, 11, 300, 42, 17]])


def _groups(model):
    return [f for layer in model.model.layers for f in (layer.self_attn.qkv, layer.self_attn.o_tier, layer.mlp.gate_up)
            if f is not None]


def _held_bytes(model) -> int:
    """Bytes of the weights the model holds in plain tensors: its parameters and the fused concatenations (each
    storage once)."""
    tensors = [*model.parameters(), *(f.weight for f in _groups(model))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _logits(model):
    with torch.inference_mode():
        return model(TOKENS)


@pytest.fixture
def tier(zeroc_tier_dir, cpu_kernel):
    """The tier model (fused Q/K/V with a tier's projections, summed output projections, per-head ranks), tied
    LM head, on the cpu backend."""
    return load_model(zeroc_tier_dir, attention_backend="cpu")


def test_a_served_model_holds_each_gemm_weight_once_with_the_same_logits(tier):
    model = tier.model
    want_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.prepare_to_serve(release=False)
    want, before = _logits(model), _held_bytes(model)
    model.release_plain_weights()
    groups = _groups(model)
    assert len(groups) == 3 * model.config.num_hidden_layers and all(f.pack.released for f in groups)
    served = {id(p) for f in groups for p in f.parts}
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for lin in linears:
        tied = lin.weight is model.model.embed_tokens.weight  # the embedding reads it: kept, and its pack too
        assert lin.pack.released == (id(lin) not in served and not tied)
        assert (lin.weight.numel() == 0) == (not tied)
    released = sum(f.pack.packed.numel() for f in groups)
    released += sum(lin.pack.packed.numel() for lin in linears if lin.pack.released)
    assert before - _held_bytes(model) == released * 4  # fp32: every released weight's bytes, and nothing else
    assert torch.equal(_logits(model), want)
    state = model.state_dict()  # the plain weights, the same bits, and released again after
    assert state.keys() == want_state.keys() and all(torch.equal(state[k], want_state[k]) for k in state)
    assert all(f.pack.released for f in groups) and torch.equal(_logits(model), want)


def test_what_reads_the_plain_weights_gets_them_back(tier):
    model = tier.model
    model.prepare_to_serve(release=True)
    want = _logits(model)
    twin = copy.deepcopy(model)  # the copy: plain weights, its packs empty; the original released again
    assert all(f.pack.released for f in _groups(model))
    assert all(not f.pack.released and f.pack.packed is None and f.fresh for f in _groups(twin))
    assert torch.equal(_logits(twin), want)
    q = twin.model.layers[0].self_attn.q_proj.weight
    assert q.numel() > 0 and q.untyped_storage().data_ptr() == _groups(twin)[0].weight.untyped_storage().data_ptr()
    state = twin.state_dict()
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"] * 2
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"] * 2
    twin.load_state_dict(state)
    model.load_state_dict(state)  # into the plain weights, packed again and released again
    assert all(f.pack.released for f in _groups(model))
    assert torch.equal(_logits(model), _logits(twin)) and not torch.equal(_logits(model), want)
    model.to(torch.float64)  # a cast from the plain weights
    assert not any(f.pack.released for f in _groups(model)) and model.lm_head.weight.dtype == torch.float64


def test_another_backend_runs_the_restored_weights(tier):
    model = tier.model
    model.prepare_to_serve(release=True)
    want = _logits(model)
    model.backend = TorchBackend()  # F.linear on the plain weights, which the packs gave back
    assert all(m.weight.numel() > 0 and m.pack.packed is None for m in model.modules() if isinstance(m, Linear))
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # and what the packs cannot run, the plain weights can
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        model(TOKENS).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_an_engine_releases_the_weights_when_asked_unless_its_layers_compile(tier):
    Engine(tier)  # by default the caller's model keeps its weights readable
    assert not any(f.pack.released for f in _groups(tier.model)) and _groups(tier.model)[0].pack.packed is not None
    Engine(tier, release_weights=True)
    assert all(f.pack.released for f in _groups(tier.model))
    with pytest.raises(RuntimeError, match="released for serving"):
        with torch.enable_grad():
            tier.model.model.layers[0].mlp.down_proj(torch.ones(1, 1024, requires_grad=True))
    other = load_model(tier.path, attention_backend="cpu")
    Engine(other, scheduler=SchedulerConfig(compile_layers=True), release_weights=True)  # compile reads them
    assert not any(f.pack.released for f in _groups(other.model)) and _groups(other.model)[0].pack.packed is not None
    assert isinstance(other.model.backend, CpuBackend)


def test_projections_served_apart_and_released_fuse_from_their_plain_weights(tier):
    """A backend that runs the projections apart releases each one's own weight; fusing them later (another
    backend's Engine, or a direct call) makes the concatenation of the plain weights, not of the placeholders."""
    model = tier.model
    want = _logits(model)
    apart = copy.copy(model.backend)
    apart.fuses_projections = False
    model.backend = apart
    model.prepare_to_serve(release=True)
    q = model.model.layers[0].self_attn.q_proj
    assert not _groups(model) and q.pack.released and q.weight.numel() == 0
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    model.fuse_projections()
    assert len(_groups(model)) == 3 * model.config.num_hidden_layers
    assert q.pack.packed is None  # the part's own pack let go: the fused GEMM has one
    assert q.weight.shape == (q.out_features, q.in_features)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
