"""The Triton attention backend through real prefill and decode service processes (the GPU path, run on the
CPU in Triton's interpreter): every layer's K/V enters the cache through the KV-write seam, whether the fused
epilogue kernel or PyTorch wrote it, so the prefill service ships all of it. Disaggregated serving gives the
colocated service's greedy tokens and ships exactly the expected KV bytes: uncompressed, ZeroC fold + rotate
(uniform layers: the fused epilogue), per-KV-head ranks, and a token tier. The disaggregated decode service
runs ahead (async scheduling, as on a GPU), the colocated one step by step. The flex backend (FlexAttention for
paged attention) gives the triton backend's tokens through the same processes. A guided request (structured
output) gives the same tokens both ways too."""

from __future__ import annotations

import re

import pytest

from stacks import colocated, disaggregated, kv_dims
from zeroc.client import Client
from zeroc.loader import load_model

TRITON = {"ZEROC_ATTENTION_BACKEND": "triton", "TRITON_INTERPRET": "1"}
PROMPTS = ["The built-in function", "import os\nprint(os.getcwd())  # the current directory, then a list"]
NEW = 4
GUIDE = {"regex": r"[a-z]{2,5}@[a-z]{2,5}\.com"}  # structured output's mask, on the triton backend's logits
MODELS = ["uncompressed", "fold+rotate", "per-head", "tier"]


def _model_dir(request, name: str) -> str:
    fixture = {"uncompressed": None, "fold+rotate": "zeroc_modes_dir", "per-head": "zeroc_heads_dir",
               "tier": "zeroc_tier_dir"}[name]
    return str(request.getfixturevalue("bundled").path) if fixture is None else request.getfixturevalue(fixture)


def _expected_bytes(cfg, prompt_tokens: int) -> int:
    """KV bytes a prompt ships (fp32): every token's compressed rows but the last (the decode service runs it),
    plus a token tier's full-width rows of its sinks and recent window."""
    n, dims = prompt_tokens - 1, kv_dims(cfg)
    if not cfg.has_tier:
        return 4 * n * dims
    full = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    return 4 * (n * dims + min(n, cfg.compression.sinks + cfg.compression.recent) * (full - dims))


def _assert_serves(address: str, backend: str, want: dict, cfg) -> None:
    """The disaggregated stack at `address` runs `backend`, gives `want`'s greedy tokens for every prompt and ships
    the expected KV bytes. A generous deadline: on the CPU the flex backend compiles each new step shape (seconds,
    minutes on a loaded machine) inside the first requests."""
    with Client(address, timeout=900) as client:
        assert client.model_info().attention_backend == backend
        for prompt in PROMPTS:
            got = client.generate(prompt, max_tokens=NEW, ignore_eos=True)
            assert got.token_ids == want[prompt].token_ids
            assert got.usage.kv_bytes_received == _expected_bytes(cfg, got.usage.prompt_tokens)
        if "guided" in want:
            guided = client.generate(PROMPTS[0], max_tokens=20, guide=GUIDE)
            assert guided.token_ids == want["guided"].token_ids and guided.finish_reason == "stop"


@pytest.mark.parametrize("name", MODELS)
def test_triton_backend_disaggregated_equals_colocated_and_ships_every_layer(request, name):
    model_dir = _model_dir(request, name)
    cfg = load_model(model_dir).config
    want = {}
    for address in colocated(model_dir, env=TRITON):
        with Client(address) as client:
            assert client.model_info().attention_backend == "triton"
            want = {p: client.generate(p, max_tokens=NEW, ignore_eos=True) for p in PROMPTS}
            want["guided"] = client.generate(PROMPTS[0], max_tokens=20, guide=GUIDE)
            assert re.fullmatch(GUIDE["regex"], want["guided"].text)
    for address in disaggregated(model_dir, decode_env={"ZEROC_SCHEDULER_ASYNC_SCHEDULING": "1"}, env=TRITON):
        _assert_serves(address, "triton", want, cfg)


def test_flex_backend_gives_the_triton_backends_tokens_through_the_services(request):
    # The flex backend (torch's FlexAttention for paged attention; compiled here by inductor's C++ lowering) in real
    # prefill and decode processes: the greedy tokens of the triton backend's colocated service, the KV bytes shipped.
    model_dir = _model_dir(request, "uncompressed")
    cfg = load_model(model_dir).config
    for address in colocated(model_dir, env=TRITON):
        with Client(address) as client:
            want = {p: client.generate(p, max_tokens=NEW, ignore_eos=True) for p in PROMPTS}
    for address in disaggregated(model_dir, env={**TRITON, "ZEROC_ATTENTION_BACKEND": "flex"}):
        _assert_serves(address, "flex", want, cfg)
