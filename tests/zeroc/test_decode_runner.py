"""DecodeRunner: the padded static-buffer path (what CUDA graphs replay) run eagerly on the CPU gives the
same tokens as the unpadded path; buckets; the enforce-eager setting."""

from __future__ import annotations

import pytest

from zeroc.config import CacheConfig, SchedulerConfig, ZeroCConfig
from zeroc.decode_runner import PAD_SEQUENCE, DecodeRunner, buckets, graphs_supported
from zeroc.engine import Engine
from zeroc.sampling import SamplingParams

PROMPTS = ["The built-in function", "import os\n", "A list comprehension is", "Exceptions are raised",
           "def f(x):\n    return x", "print(", "class A:"]


def _run(loaded, prompts, padded: bool):
    engine = Engine(loaded, CacheConfig(16, 64), SchedulerConfig(max_num_seqs=8))
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


def test_enforce_eager_is_a_root_config_setting():
    assert ZeroCConfig.from_env({"ZEROC_SCHEDULER_ENFORCE_EAGER": "1"}).scheduler.enforce_eager is True
    assert ZeroCConfig.from_env({"ZEROC_SCHEDULER_ENFORCE_EAGER": "false"}).scheduler.enforce_eager is False
    assert ZeroCConfig.from_env({}).scheduler.enforce_eager is False
    with pytest.raises(ValueError, match="ZEROC_SCHEDULER_ENFORCE_EAGER"):
        ZeroCConfig.from_env({"ZEROC_SCHEDULER_ENFORCE_EAGER": "maybe"})
