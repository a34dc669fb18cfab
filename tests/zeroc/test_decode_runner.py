"""DecodeRunner: the padded static-buffer path (what CUDA graphs replay) run eagerly on the CPU gives the
same tokens as the unpadded path; buckets; the enforce-eager setting."""

from __future__ import annotations

import pytest

from zeroc.config import CacheConfig, SchedulerConfig, ZeroCConfig
from zeroc.decode_runner import PAD_SEQUENCE, DecodeRunner, buckets, graph_safe, graphs_supported
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\n", "A list comprehension is", "Exceptions are raised",
           "def f(x):\n    return x", "print(", "class A:"]


@pytest.fixture(scope="module")
def tiered(bundled, bundled_factors):
    """The bundled model at Q/K rank 32 and V rank 16 (fold) with a token tier of 2 sinks and 6 recent tokens,
    on the triton backend (Triton's interpreter here), as CUDA graphs would run it."""
    from zeroc.compression.fold import build_compressed
    from zeroc.config import AttentionCompression
    from zeroc.loader import LoadedModel
    from zeroc_kernels.attention import select_backend

    layers = tuple(f.layer_compression(32, 16, "fold") for f in bundled_factors)
    model = build_compressed(bundled.model, bundled_factors,
                             AttentionCompression(layers, "runner-tier", 0.375, "zeroc-fold", sinks=2, recent=6))
    model.backend = select_backend("triton", "cpu")
    return LoadedModel(model, model.config, bundled.tokenizer, bundled.path)


def _run(loaded, prompts, padded: bool, kv_policy: str = "none"):
    engine = Engine(loaded, CacheConfig(16, 64, kv_policy=kv_policy), SchedulerConfig(max_num_seqs=8))
    assert not engine.decode_runner.pad and not engine.decode_runner.use_graphs  # the CPU default
    if padded:
        engine.decode_runner = DecodeRunner(engine.model, engine.cache, engine.state, use_graphs=False, pad=True)
    # ragged lengths: sequences finish at different steps, so the decode batch shrinks through buckets
    params = [SamplingParams(max_new_tokens=3 + 2 * i, ignore_eos=True) for i in range(len(prompts))]
    results = engine.generate(prompts, params)
    return engine, [r.token_ids for r in results]


@pytest.mark.parametrize("n", [3, 5, 7])  # padded to 4, 8 and 8 rows
def test_the_padded_static_buffer_path_gives_the_unpadded_tokens(bundled, n):
    _, want = _run(bundled, PROMPTS[:n], padded=False)
    engine, got = _run(bundled, PROMPTS[:n], padded=True)
    assert got == want
    runner = engine.decode_runner
    assert engine.cache.block_table(PAD_SEQUENCE) == [runner.pad_block]  # pad rows wrote only there
    assert engine.cache.num_free_blocks == engine.cache.num_blocks - 1
    runner.close()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_a_tiered_models_decode_steps_take_the_padded_path_too(tiered):
    """A token tier's pools find every row from the device's tables, so its decode steps are graph-safe: padded
    to buckets (pad rows in the scratch block, borrowing their own tier block) they give the unpadded tokens,
    and every borrowed block returns."""
    _, want = _run(tiered, PROMPTS[:3], padded=False)
    engine, got = _run(tiered, PROMPTS[:3], padded=True)
    assert got == want
    assert graph_safe(engine.model, engine.cache) and not graphs_supported(engine.model, engine.cache)  # no CUDA
    engine.decode_runner.close()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.cache.pools.borrowed


def test_int8_pools_are_graph_safe_and_host_walking_ones_are_not(bundled):
    """The int8 store quantises and attends through the backend from device tensors alone: padded, its decode steps
    give the unpadded tokens, and graphs may hold them. KIVI walks sequences on the host: never graphed."""
    import copy
    import dataclasses

    from zeroc_kernels.attention import select_backend

    triton = dataclasses.replace(bundled, model=copy.deepcopy(bundled.model))
    triton.model.backend = select_backend("triton", "cpu")
    _, want = _run(triton, PROMPTS[:3], padded=False, kv_policy="int8")
    engine, got = _run(triton, PROMPTS[:3], padded=True, kv_policy="int8")
    assert got == want and graph_safe(engine.model, engine.cache)
    kivi = Engine(triton, CacheConfig(32, 32, kv_policy="kivi-4"))
    assert not graph_safe(kivi.model, kivi.cache)


def test_the_graphed_function_reads_only_the_persistent_buffers(bundled):
    """Run twice on unchanged buffers it gives the same logits (it recomputes the same K/V into the same
    slots); changing a buffer in place changes them."""
    engine = Engine(bundled, CacheConfig(16, 64), SchedulerConfig(max_num_seqs=4))
    runner = DecodeRunner(engine.model, engine.cache, engine.state, use_graphs=False, pad=True)
    engine.decode_runner = runner
    for p in PROMPTS[:3]:
        engine.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.step()
    engine.step()
    runner._fill_pad(3, 4)
    first, again = runner.forward(4), runner.forward(4)
    assert (first == again).all()
    engine.state.token_ids[0] += 1
    assert not (runner.forward(4)[0] == first[0]).all()


def test_buckets_and_where_graphs_run(bundled):
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    engine = Engine(bundled, CacheConfig(16, 8))
    assert not graphs_supported(engine.model, engine.cache)  # CPU
    assert not graph_safe(engine.model, engine.cache)  # the cpu backend's kernel is not Triton's


@pytest.mark.parametrize("name", ["triton", "flex"])
def test_the_triton_and_flex_backends_may_be_graphed(bundled, monkeypatch, name):
    # Each takes lengths and tables on the device (gpu_engine.py's checks replay their steps in graphs on CUDA)
    import copy

    from zeroc_kernels.attention import select_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    engine = Engine(bundled, CacheConfig(16, 8))
    engine.model = copy.copy(engine.model)
    engine.model.backend = select_backend(name, "cpu")
    assert graph_safe(engine.model, engine.cache)


def test_enforce_eager_is_a_root_config_setting():
    assert ZeroCConfig.from_env({"ZEROC_SCHEDULER_ENFORCE_EAGER": "1"}).scheduler.enforce_eager is True
    assert ZeroCConfig.from_env({"ZEROC_SCHEDULER_ENFORCE_EAGER": "false"}).scheduler.enforce_eager is False
    assert ZeroCConfig.from_env({}).scheduler.enforce_eager is False
    with pytest.raises(ValueError, match="ZEROC_SCHEDULER_ENFORCE_EAGER"):
        ZeroCConfig.from_env({"ZEROC_SCHEDULER_ENFORCE_EAGER": "maybe"})
