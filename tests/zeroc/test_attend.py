"""How a paged forward attends a fresh batch (prompts with no cached prefix): through the backend's
`fresh_prefill` from the backend's threshold up, reading the rows back from the cache whoever wrote them (PyTorch,
the fused epilogue, per-head runs), and giving the oracle's tokens; batches with context take the paged kernels.
And how the dense forward attends with a token tier: by segments where no gradient is needed."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.loader import load_model
from zeroc.sampling import SamplingParams
from zeroc_kernels.attention import triton_runs_on

PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())  # the current directory", "A list"]
GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
BACKENDS = ["cpu"] + ["triton"] * triton_runs_on(torch.device("cpu"))


def _generate(model_dir, backend, floor=None, budget=4096):
    """Greedy tokens of PROMPTS in one batch, and the new-token counts of each batch that took fresh_prefill."""
    loaded = load_model(model_dir, attention_backend=backend)
    calls: list[tuple[int, ...]] = []
    if floor is not None:
        be = loaded.model.backend
        be.fresh_prefill_min_tokens = floor
        real = be.fresh_prefill

        def counted(q, k, v, query_lens, scale):
            calls.append(tuple(query_lens))
            return real(q, k, v, query_lens, scale)
        be.fresh_prefill = counted
    engine = Engine(loaded, CacheConfig(16, 128), SchedulerConfig(max_num_batched_tokens=budget))
    return [r.token_ids for r in engine.generate(PROMPTS, GREEDY)], calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["uncompressed", "fold+rotate", "per-head"])
def test_a_fresh_batch_attends_its_own_rows_and_gives_the_oracles_tokens(request, backend, model):
    model_dir = {"uncompressed": lambda: str(request.getfixturevalue("bundled").path),
                 "fold+rotate": lambda: request.getfixturevalue("zeroc_modes_dir"),
                 "per-head": lambda: request.getfixturevalue("zeroc_heads_dir")}[model]()
    want, _ = _generate(model_dir, "torch")
    got, calls = _generate(model_dir, backend, floor=1)
    assert got == want
    layers = load_model(model_dir).config.num_hidden_layers
    # The first step prefills all three prompts at once (every layer, every run of a per-head layer); the
    # decode steps after it have context and stay on the paged kernels.
    assert len(calls) >= layers and set(calls) == {calls[0]} and len(calls[0]) == len(PROMPTS)


def test_a_prompt_chunked_after_its_first_chunk_is_not_fresh(bundled):
    """A budget of 8 tokens a step: the first step (the first prompt and a first chunk of the second) is
    fresh; every later chunk has context, and so do the steps mixing decodes in."""
    want, _ = _generate(str(bundled.path), "torch", budget=8)
    got, calls = _generate(str(bundled.path), "cpu", floor=1, budget=8)
    assert got == want
    assert len(calls) == bundled.config.num_hidden_layers and sum(calls[0]) == 8 and len(calls[0]) == 2


def test_below_the_threshold_the_paged_kernel_attends(bundled):
    got, calls = _generate(str(bundled.path), "cpu", floor=10_000)
    assert calls == [] and got == _generate(str(bundled.path), "torch")[0]


class _SquareShapes(TorchDispatchMode):
    """Records the shapes of op outputs with two dims of `length` (a [T, T] mask or scores of T tokens)."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.seen = length, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(d == self.length for d in t.shape) >= 2:
                self.seen.append(tuple(t.shape))
        return out


def test_a_tier_models_dense_forward_without_gradients_runs_by_segments(zeroc_tier_dir):
    """`DenseCausal.tiered` (the dense forward of evaluation): with gradients the reference, which scores every
    query against every key ([T, T] masks and scores per head); without, each sequence by segments, as a paged
    prompt runs, with no [T, T] tensor. The same logits either way, per-KV-head layers and uniform ones."""
    model, length = load_model(zeroc_tier_dir).model, 300  # a length no other dim of the model has
    tokens = torch.randint(2, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(8))
    segments, reference = _SquareShapes(length), _SquareShapes(length)
    with torch.no_grad(), segments:
        fast = model(tokens)
    with torch.enable_grad(), reference:
        want = model(tokens)
    assert segments.seen == [] and reference.seen, reference.seen[:3]
    torch.testing.assert_close(fast, want.detach(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model", ["uncompressed", "per-head"])
def test_the_flex_backend_plans_each_step_once_for_all_its_layers(request, monkeypatch, model):
    """The flex backend's block mask and indices depend on the step's batch alone: PagedAttend asks for them once
    a step and every layer's paged attention (every run of a per-head layer) gets that plan, with the oracle's
    tokens. Eager FlexAttention here (the compiled kernel's plans are the same): no compiles to wait for."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model_dir = str(request.getfixturevalue("bundled").path) if model == "uncompressed" else \
        request.getfixturevalue("zeroc_heads_dir")
    want, _ = _generate(model_dir, "torch")
    loaded = load_model(model_dir, attention_backend="flex")
    backend = loaded.model.backend
    backend.attend = flex_attention
    plans, given = [], []
    plan, attend = backend.plan, backend.paged_attention

    def counted_plan(*args):
        plans.append(plan(*args))
        return plans[-1]

    def counted_attend(*args, plan=None, **kwargs):
        given.append(plan)
        return attend(*args, plan=plan, **kwargs)

    backend.plan, backend.paged_attention = counted_plan, counted_attend
    engine = Engine(loaded, CacheConfig(16, 128))
    assert [r.token_ids for r in engine.generate(PROMPTS, GREEDY)] == want
    layers = loaded.config.num_hidden_layers
    assert len(plans) == GREEDY.max_new_tokens and all(p is not None for p in plans)  # a step per token here
    assert [sum(g is p for g in given) for p in plans] == [len(given) // len(plans)] * len(plans)
    assert len(given) // len(plans) >= layers
