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
from zeroc_kernels.attention import CpuBackend, TorchBackend, TritonBackend


class _Counting(TorchBackend):
    """The torch backend, counting its layer-op calls (the references still compute them)."""

    def __init__(self):
        self.calls = {"rms_norm": 0, "add_rms_norm": 0, "silu_mul": 0, "linear": 0, "apply_rope": 0}

    def rms_norm(self, x, weight, eps):
        self.calls["rms_norm"] += 1
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        self.calls["add_rms_norm"] += 1
        return super().add_rms_norm(x, residual, weight, eps)

    def apply_rope(self, x, cos, sin):
        self.calls["apply_rope"] += 1
        return super().apply_rope(x, cos, sin)

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
        # seven GEMMs a layer (q, k, v, o, gate, up, down) and the LM head; RoPE's shared tables on q and k
        assert model.backend.calls == {"rms_norm": 1, "add_rms_norm": 2 * layers, "silu_mul": layers,
                                       "linear": 7 * layers + 1, "apply_rope": 2 * layers}, name


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", ["triton", "cpu"])
def test_the_fused_kernels_give_the_reference_logits(random_gqa, dtype, fused, request):
    """triton's kernels, and the cpu backend's C++ norms and RoPE (with its oneDNN GEMMs and attention kernel)."""
    if fused == "cpu":
        request.getfixturevalue("cpu_kernel")  # the module builds here (or the test skips without a compiler)
    model = copy.deepcopy(random_gqa.model).to(dtype)
    tokens = torch.randint(2, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = {}
    for backend in (TorchBackend(), TritonBackend() if fused == "triton" else CpuBackend()):
        model.backend = backend
        logits[backend.name] = model(tokens).float()
    # fp32: one rounding order apart; bf16: the same roundings, up to a tipped last bit carried through 3 layers
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits[fused], logits["torch"], atol=tol, rtol=tol)
    assert logits[fused].argmax(-1).eq(logits["torch"].argmax(-1)).float().mean() > 0.9


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
    assert model.backend.calls == {"rms_norm": 1, "add_rms_norm": layers, "silu_mul": 0, "linear": 5 * layers + 1,
                                   "apply_rope": 2 * layers}
    assert not counters["graph_break"], dict(counters["graph_break"])


# views, allocations, and ops on dtypes (the fused norm's `torch.promote_types`): nothing a device runs
_VIEWS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute",
          "as_strided", "split_with_sizes", "split", "unflatten", "flatten", "alias", "detach", "narrow", "reshape",
          "_reshape_alias", "unbind", "empty", "empty_strided", "new_empty", "lift_fresh", "set_", "promote_types"}


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
        # `reshape` and `flatten` reach the mode whole under inference mode, and copy where strides forbid a view
        copied = name in ("reshape", "flatten") and out.untyped_storage().data_ptr() != args[0].untyped_storage(
        ).data_ptr()
        if not noop and (name not in _VIEWS or copied) and not any(
                f"{os.sep}triton{os.sep}" in frame.filename for frame in traceback.extract_stack()):
            self.count += 1
        return out


def _decode_step_kernels(loaded, calls: list[tuple[object, str]]) -> int:
    """Kernels launched inside the methods `calls` names ((object, method name) pairs) in a decode step of two
    sequences on the triton backend, the prompts and a first decode step run before it: aten ops as `_Kernels`
    counts them, plus one per call of a backend method that is one Triton launch."""
    from zeroc.engine import Engine
    from zeroc.sampling import SamplingParams

    engine = Engine(loaded, CacheConfig(16, 64))
    for i in range(2):
        engine.add_request(list(range(5 + i, 40 + i)), SamplingParams(max_new_tokens=8, ignore_eos=True))
    for _ in range(3):  # the prompts, then decode steps
        engine.step()
    mode, backend, inside = _Kernels(), loaded.model.backend, [0]
    for name in ("rope", "tier_qkv", "tier_decode", "decode_partials", "rms_norm", "add_rms_norm", "silu_mul"):
        def launch(*args, _f=getattr(backend, name), **kwargs):
            mode.count += inside[0] > 0
            return _f(*args, **kwargs)
        setattr(backend, name, launch)
    for obj, method in calls:
        def counted(*args, _f=getattr(obj, method), **kwargs):
            inside[0] += 1
            try:
                with mode:
                    return _f(*args, **kwargs)
            finally:
                inside[0] -= 1
        setattr(obj, method, counted)
    engine.step()
    return mode.count


def test_a_token_tier_decode_step_launches_few_kernels(zeroc_tier_dir):
    """Per-KV-head ranks and a token tier, fold and rotate layers, on triton: projections fused, RoPE one kernel per
    tensor, the tier's decode segment one kernel, per-head queries scattered and outputs gathered in one op each.
    A step's attention layers launched 749 kernels before those four, 466 with RoPE's tables, 296 with the
    per-head copies and 263 without them, counting ops that hand back their input (docs/engine.md, "Fewer kernels
    per layer"); counting only ops that run, reshapes that copy included, 219, and 207 once the compressed
    segment's queries are read in place and a uniform fold layer's RoPE and joins are one kernel."""
    from zeroc.loader import load_model

    loaded = load_model(zeroc_tier_dir, attention_backend="triton")
    count = _decode_step_kernels(loaded, [(layer.self_attn, "forward") for layer in loaded.model.model.layers])
    assert 0 < count < 210, count


def test_a_fold_tier_layers_decode_step_launches_few_kernels():
    """A fold layer with a token tier (every KV head at one rank, as `zeroc bench engine` builds them), on triton,
    after the step's first layer built its index tensors: its GEMMs (Q/K/V with the tier's projections, o_proj
    with tier_o_proj, gate/up, down), the two norms, the gate, RoPE and the full-rank joins in one kernel
    (`tier_qkv`), the compressed segment's decode kernel and the tier's, the two cache writes with their joins,
    and the two copies that lay the output's heads out for the summed output GEMM. 24 kernels when RoPE and the
    joins took seven and the decode kernel copied its queries; the uncompressed layer launches about ten
    (docs/engine.md, "Fewer kernels per layer")."""
    from zeroc.bench.engine import BUNDLED_MODEL, EngineBenchSpec, base_config, method_config, random_model
    from zeroc.loader import LoadedModel
    from zeroc.tokenizer import Tokenizer
    from zeroc_kernels.attention import select_backend

    cfg = method_config(base_config(EngineBenchSpec(layers=2)), "zeroc-fold-16-tier-4-8")
    model = random_model(cfg, torch.device("cpu"), torch.float32, 0)
    model.backend = select_backend("triton", "cpu")
    loaded = LoadedModel(model, cfg, Tokenizer.from_dir(BUNDLED_MODEL), BUNDLED_MODEL)
    count = _decode_step_kernels(loaded, [(model.model.layers[-1], "forward_residual")])
    assert 0 < count <= 17, count
