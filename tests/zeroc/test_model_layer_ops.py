"""The model's norms, SwiGLU gate and GEMMs go through its backend (zeroc/model.py, kernels/layer_ops.py): on every
forward, so that the triton backend's fused kernels serve the paged, dense and caller-attended paths alike;
and what the fused kernels compute is what the references compute, in half precision too."""

from __future__ import annotations

import copy
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_copies import unfused_copy
from zeroc.attend import causal_attend
from zeroc.caches import paged_cache
from zeroc.config import CacheConfig
from zeroc.kv_cache import layer_shapes
from zeroc.model import compile_feed_forward
from zeroc_kernels.attention import TorchBackend, TritonBackend


class _Counting(TorchBackend):
    """The torch backend, counting its layer-op calls (the references still compute them)."""

    def __init__(self):
        self.calls = {"rms_norm": 0, "add_rms_norm": 0, "silu_mul": 0, "linear": 0}

    def rms_norm(self, x, weight, eps):
        self.calls["rms_norm"] += 1
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        self.calls["add_rms_norm"] += 1
        return super().add_rms_norm(x, residual, weight, eps)

    def silu_mul(self, gate, up):
        self.calls["silu_mul"] += 1
        return super().silu_mul(gate, up)

    def linear(self, x, weight, bias=None, pack=None):
        self.calls["linear"] += 1
        return super().linear(x, weight, bias, pack)


def _forwards(model):
    """One of each forward the model has: dense causal, paged, a caller's attention."""
    tokens = torch.randint(2, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    yield "dense", lambda: model(tokens)
    cache = paged_cache(layer_shapes(model.config), CacheConfig(16, 4), torch.float32, model=model)
    batch = cache.schedule([("a", 9)])
    yield "paged", lambda: model.forward_paged(tokens[0], batch.positions, batch, cache)
    yield "caller", lambda: model.forward_attend(tokens, torch.arange(9)[None], causal_attend)


@torch.inference_mode()
def test_every_forward_takes_the_norms_the_gate_and_the_gemms_from_the_backend(random_gqa):
    model = unfused_copy(random_gqa.model)
    layers = model.config.num_hidden_layers
    for name, forward in _forwards(model):
        model.backend = _Counting()  # setting it hands its `linear` to every Linear of the model
        forward()
        # the first norm reads the embeddings alone; every later one, the final norm too, a residual add's sum;
        # seven GEMMs a layer (q, k, v, o, gate, up, down) and the LM head
        assert model.backend.calls == {"rms_norm": 1, "add_rms_norm": 2 * layers, "silu_mul": layers,
                                       "linear": 7 * layers + 1}, name


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernels_give_the_reference_logits(random_gqa, dtype):
    model = copy.deepcopy(random_gqa.model).to(dtype)
    tokens = torch.randint(2, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = {}
    for backend in (TorchBackend(), TritonBackend()):
        model.backend = backend
        logits[backend.name] = model(tokens).float()
    # fp32: one rounding order apart; bf16: the same roundings, up to a tipped last bit carried through 3 layers
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=tol, rtol=tol)
    assert logits["triton"].argmax(-1).eq(logits["torch"].argmax(-1)).float().mean() > 0.9


def test_compiled_layers_keep_the_backend_and_the_fused_gemm_out_of_the_graph(random_gqa):
    """A compiled feed-forward computes the references (inductor fuses them) with the MLP's GEMMs, in one graph:
    of the norms and the gate the backend sees only the layers' input norms and the final one, and nothing breaks
    the graph. Its GEMMs trace through the backend's `linear` (F.linear on the torch backend; the cpu backend's
    oneDNN op steps aside inside torch.compile), and so does the fused Q/K/V GEMM (zeroc/fused_linears.py)."""
    from torch._dynamo.utils import counters

    model = unfused_copy(random_gqa.model)
    model.fuse_projections()
    compile_feed_forward(model)
    model.backend = _Counting()
    counters.clear()
    with torch.inference_mode():
        model(torch.randint(2, 100, (1, 5)))
    layers = model.config.num_hidden_layers
    # the fused Q/K/V and o_proj, then gate, up and down in the compiled feed-forward, a layer; the LM head
    assert model.backend.calls == {"rms_norm": 1, "add_rms_norm": layers, "silu_mul": 0, "linear": 5 * layers + 1}
    assert not counters["graph_break"], dict(counters["graph_break"])


_VIEWS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute",
          "as_strided", "split_with_sizes", "split", "unflatten", "flatten", "alias", "detach", "narrow", "reshape",
          "_reshape_alias", "unbind", "empty", "empty_strided", "new_empty", "lift_fresh", "set_"}


class _Kernels(TorchDispatchMode):
    """Counts what launches a kernel on a GPU: aten ops other than views and allocations, but not the copies
    Triton's CPU interpreter makes of a kernel's arguments (ops called from inside triton's package); the
    Triton kernels themselves are counted by the caller, one per launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out, name = func(*args, **(kwargs or {})), func.overloadpacket.__name__
        # an out-of-place op that hands back its input (`to` the dtype it has, `contiguous` of a dense tensor) runs
        # nothing; in-place ones (copy_, index_put_) hand back theirs after running
        noop = bool(args) and out is args[0] and not name.endswith("_")
        if not noop and name not in _VIEWS and not any(
                f"{os.sep}triton{os.sep}" in frame.filename for frame in traceback.extract_stack()):
            self.count += 1
        return out


def test_a_token_tier_decode_step_launches_few_kernels(zeroc_tier_dir):
    """Per-KV-head ranks and a token tier, fold and rotate layers, on triton: projections fused, RoPE one kernel per
    tensor, the tier's decode segment one kernel, per-head queries scattered and outputs gathered in one op each.
    A step's attention layers launched 749 kernels before those four, 466 with RoPE's tables, 296 with the
    per-head copies and 263 without them, counting ops that hand back their input (docs/engine.md, "Fewer kernels
    per layer"); counting only ops that run, they launch under 250 (219 when written, 207 once a decode step's tier
    rows are sliced, not gathered)."""
    from zeroc.engine import Engine
    from zeroc.loader import load_model
    from zeroc.sampling import SamplingParams

    loaded = load_model(zeroc_tier_dir, attention_backend="triton")
    engine = Engine(loaded, CacheConfig(16, 64))
    for i in range(2):
        engine.add_request(list(range(5 + i, 40 + i)), SamplingParams(max_new_tokens=8, ignore_eos=True))
    for _ in range(3):  # the prompts, then decode steps
        engine.step()
    mode, backend = _Kernels(), loaded.model.backend
    for name in ("rope", "tier_decode", "decode_partials"):  # one Triton launch each
        def launch(*args, _f=getattr(backend, name), **kwargs):
            mode.count += 1
            return _f(*args, **kwargs)
        setattr(backend, name, launch)
    attention = [layer.self_attn for layer in loaded.model.model.layers]
    calls = [a.forward for a in attention]
    for a, forward in zip(attention, calls):
        def counted(*args, _f=forward, **kwargs):
            with mode:
                return _f(*args, **kwargs)
        a.forward = counted
    engine.step()
    assert 0 < mode.count < 250, mode.count
