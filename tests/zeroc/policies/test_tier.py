"""The token tier in the paged cache (zeroc/policies/tier.py): ragged chunked prefill and decode equal the
dense tiered forward, the tier's rows cost blocks of the cache's budget, and they travel on the wire."""

from __future__ import annotations

import pytest
import torch

from zeroc.compression.calibrate import collect_statistics, compute_factors
from zeroc.compression.fold import build_compressed
from zeroc.config import AttentionCompression, CacheConfig, SchedulerConfig
from zeroc.eval.perplexity import perplexity_full, perplexity_streaming
from zeroc.caches import paged_cache
from zeroc.kv_cache import CacheFullError, PagedKVCache, layer_shapes
from zeroc.kv_transfer import (TIER_KEY, KvTransferError, decode_chunk, encode_layer, encode_layer_wire,
                               parse_prefill_response)
from zeroc.loader import LoadedModel
from zeroc_kernels.attention import select_backend
from zeroc.transport.landing import receive_into
from zeroc.policies.tier import TierPools, tier_policy
from prefill_service.worker import DONE, PrefillJob, PrefillWorker


@pytest.fixture(scope="module")
def tiered_of(bundled):
    """build(mode, sinks, recent): the bundled model at Q/K rank d/2 and V rank d/4 with a token tier."""
    model = bundled.model
    calib = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(3))
    factors = compute_factors(model, collect_statistics(model, calib, progress=False, sample_tokens=128))
    d = model.config.head_dim

    def build(mode: str, sinks: int, recent: int, ranks: tuple | None = None):
        """ranks: (Q/K, V) for every layer, ints or per-KV-head tuples (default d/2, d/4)."""
        qk, v = ranks or (d // 2, d // 4)
        layers = tuple(f.layer_compression(qk, v, mode) for f in factors)
        return build_compressed(model, factors, AttentionCompression(layers, "tier-store-test", 0.375,
                                                                     f"zeroc-{mode}", sinks, recent))

    return build


def _cache(model, num_blocks: int = 64, block_size: int = 16) -> PagedKVCache:
    return paged_cache(layer_shapes(model.config), CacheConfig(block_size=block_size, num_blocks=num_blocks),
                        torch.float32, model=model)


def _run(model, cache: PagedKVCache, tokens: torch.Tensor, plan: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Feed rows of `tokens` [B, T] through the paged forward in the (sequence, new tokens) steps of `plan`
    -> each sequence's logits [tokens fed, vocab]."""
    lens, outs = [0] * tokens.shape[0], [[] for _ in range(tokens.shape[0])]
    for step in plan:
        batch = cache.schedule([(f"s{b}", n) for b, n in step])
        ids = torch.cat([tokens[b, lens[b]:lens[b] + n] for b, n in step])
        logits = model.forward_paged(ids, batch.positions, batch, cache)
        starts = batch.query_start_loc.tolist()
        for i, (b, n) in enumerate(step):
            outs[b].append(logits[starts[i]:starts[i + 1]])
            lens[b] += n
    return [torch.cat(o) for o in outs]


# Chunks straddle the window and the sinks; one sequence joins late, then both decode token by token.
PLAN = [[(0, 30), (1, 20)], [(0, 25), (1, 1)], [(1, 40)]] + [[(0, 1), (1, 1)]] * 8


TIERS = [("fold", 4, 16), ("fold", 0, 8), ("fold", 3, 0), ("rotate", 4, 16), ("rotate", 2, 200), ("rotate", 20, 3)]
# Triton's interpreter is slow (and `make test` has 20 minutes): it runs one fold tier with sinks and a window and
# one rotate tier whose sinks are wider than a block; the torch and cpu backends run all six.
TIER_CASES = [(*tier, backend) for tier in TIERS for backend in ("torch", "cpu", "triton")
              if backend != "triton" or tier in (("fold", 4, 16), ("rotate", 20, 3))]


@torch.inference_mode()
@pytest.mark.parametrize("mode, sinks, recent, backend", TIER_CASES)
def test_paged_chunks_and_decode_equal_the_dense_tiered_forward(tiered_of, mode, sinks, recent, backend):
    """Decode steps take the compressed segment from the backend's paged decode kernel (keys from the sinks
    on); chunks take the reference path. Sinks wider than a block, a window wider than the context."""
    model = tiered_of(mode, sinks, recent)
    model.backend = select_backend(backend, "cpu")
    tokens = torch.randint(0, model.config.vocab_size, (2, 69), generator=torch.Generator().manual_seed(5))
    dense = model(tokens)  # [2, 69, vocab]
    cache = _cache(model)
    assert isinstance(cache.pools, TierPools)
    got = _run(model, cache, tokens, PLAN)
    for b in range(2):
        assert (got[b] - dense[b, : got[b].shape[0]]).abs().max().item() < 1e-4
    held = cache.num_blocks - cache.num_free_blocks
    policy = tier_policy(model.config)
    want = sum(-(-n // 16) + policy.tier_blocks(cache.shapes, 16, n) for n in (63, 69))
    assert held == want  # every sequence's own blocks plus the tier's borrowed ones
    cache.free("s0")
    cache.free("s1")
    assert cache.num_free_blocks == cache.num_blocks and not cache.pools.borrowed  # nothing leaks
    assert (cache.pools.tier_ids == cache.pools.trash).all()  # the device's copy forgets them too


@torch.inference_mode()
@pytest.mark.parametrize("sinks, recent", [(4, 16), (3, 0)])
def test_slots_nobody_wrote_never_reach_an_output(tiered_of, sinks, recent):
    """Every pool poisoned with NaN first (stale rows of freed sequences, the trash block, tier slots not held
    yet): only what the steps wrote may be read, so the outputs stay the dense forward's."""
    model = tiered_of("fold", sinks, recent)
    tokens = torch.randint(0, model.config.vocab_size, (2, 69), generator=torch.Generator().manual_seed(6))
    dense = model(tokens)  # [2, 69, vocab]
    cache = _cache(model)
    for pool in cache.pools.pools:
        pool.fill_(float("nan"))
    got = _run(model, cache, tokens, PLAN)
    for b in range(2):
        assert (got[b] - dense[b, : got[b].shape[0]]).abs().max().item() < 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_kv_head_ranks_with_a_tier_equal_the_dense_forward(tiered_of, backend):
    """A layer with per-KV-head ranks caches one row of all its heads' dims: its tier decode steps go through the
    decode kernel with that row as one KV head, and still give the dense tiered forward."""
    model = tiered_of("fold", 2, 8, ranks=((24, 40), (8, 24)))
    model.backend = select_backend(backend, "cpu")
    assert model.config.kv_geometry(0)[0] == 1  # one cached row for both KV heads
    tokens = torch.randint(0, model.config.vocab_size, (2, 69), generator=torch.Generator().manual_seed(8))
    dense = model(tokens)
    got = _run(model, _cache(model), tokens, PLAN)
    for b in range(2):
        assert (got[b] - dense[b, : got[b].shape[0]]).abs().max().item() < 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("cached", [0, 3, 30])
@pytest.mark.parametrize("sinks, recent", [(4, 16), (0, 8), (3, 0), (2, 200)])
def test_a_chunk_the_host_can_place_attends_as_the_masked_path_does(tiered_of, sinks, recent, cached):
    """`_attend_chunk` (flash over the compressed segments, local attention over the full-rank one, the cached rows
    read in position order) against `_attend_group` (one masked softmax over the cache and the tier rows), on a
    prompt with nothing cached and on chunks after 3 and 30 cached tokens."""
    model = tiered_of("fold", sinks, recent)
    cache, gen = _cache(model), torch.Generator().manual_seed(9)
    pools, t = cache.pools, cache.pools.policy.layers[0]
    heads, kv = model.config.num_attention_heads, cache.shapes[0].kv_heads

    def rows(n: int):
        return (torch.randn(n, heads, t.k_dim + t.tier_k, generator=gen),
                torch.randn(n, kv, t.k_dim + t.tier_k, generator=gen),
                torch.randn(n, kv, t.v_dim + t.tier_v, generator=gen))

    if cached:
        q, k, v = rows(cached)
        pools.stage(0, k, v)
        pools.attend(0, q, cache.schedule([("s0", cached)]), 0.3)
    batch = cache.schedule([("s0", 45)])
    assert batch.starts == (cached,) and batch.fresh == (cached == 0)
    q, k, v = rows(45)
    before = pools.pools[0].clone()
    pools.stage(0, k, v)
    got = pools.attend(0, q, batch, 0.3)  # writes the compressed rows, `_attend_chunk`, then the tier rows
    pools.pools[0].copy_(before)  # the cache as the chunk found it, its compressed rows written as `attend` does
    flat = pools.pools[0].view(-1, *pools.pools[0].shape[2:])
    flat[batch.slot_mapping] = torch.cat([k[..., : t.k_dim], v[..., : t.v_dim]], -1)
    masked = pools._attend_group(0, q, k, v, batch, 0.3)
    assert (got - masked).abs().max().item() < 1e-5


@torch.inference_mode()
def test_a_prompt_joining_decode_rows_takes_the_fresh_path_and_equals_the_dense_forward(tiered_of):
    """A prompt admitted while another sequence decodes: its rows alone are fresh, the decode row is not."""
    model = tiered_of("rotate", 4, 16)
    tokens = torch.randint(0, model.config.vocab_size, (2, 69), generator=torch.Generator().manual_seed(10))
    dense = model(tokens)
    probe = _cache(model)
    probe.schedule([("s0", 30)])
    assert probe.schedule([("s0", 1), ("s1", 50)]).starts == (30, 0)
    got = _run(model, _cache(model), tokens, [[(0, 30)], [(0, 1), (1, 50)]] + [[(0, 1), (1, 1)]] * 4)
    for b in range(2):
        assert (got[b] - dense[b, : got[b].shape[0]]).abs().max().item() < 1e-4


def test_the_tier_rows_are_paid_from_the_block_budget(tiered_of):
    model = tiered_of("fold", 4, 60)
    policy, d = tier_policy(model.config), model.config.head_dim
    tier = policy.tier_blocks(layer_shapes(model.config), 16, 64)
    # fold at Q/K d/2, V d/4: a tier row adds d/2 + 3d/4 dims to a compressed row of 3d/4
    assert tier == -(-64 * (d // 2 + 3 * d // 4) // (16 * 3 * d // 4))
    assert policy.tier_blocks(layer_shapes(model.config), 16, 10) < tier  # short sequences borrow less
    cache = _cache(model, num_blocks=4 + tier - 1)
    assert cache.blocks_needed("a", 64) == 4 + tier
    assert not cache.can_fit("a", 64)
    with pytest.raises(CacheFullError):
        cache.schedule([("a", 64)])
    assert cache.num_free_blocks == cache.num_blocks  # all-or-nothing
    assert cache.token_capacity(1000) < 64


@torch.inference_mode()
def test_streaming_perplexity_of_a_tiered_model_equals_its_full_pass(tiered_of):
    model = tiered_of("rotate", 2, 12)
    tokens = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(8))
    full = perplexity_full(model, tokens, ctx=48, progress=False)
    streaming = perplexity_streaming(model, tokens, ctx=48, batch_size=3, progress=False)
    assert streaming.perplexity == pytest.approx(full.perplexity, rel=1e-5)


@torch.inference_mode()
def test_a_prompt_with_its_tier_rows_crosses_the_wire_and_decoding_continues_exactly(tiered_of, bundled):
    """The prefill service's worker computes a prompt and ships its compressed rows plus its tier rows as
    wire chunks; the decode side parses, lands and loads them, then decodes on as if it had prefilled."""
    model = tiered_of("fold", 3, 10)
    tokens = torch.randint(0, model.config.vocab_size, (1, 45), generator=torch.Generator().manual_seed(9))
    dense = model(tokens)[0]
    prompt = 40
    worker = PrefillWorker(LoadedModel(model, model.config, bundled.tokenizer, bundled.path), CacheConfig(),
                           SchedulerConfig())
    try:
        job = PrefillJob("r", tokens[0, :prompt].tolist(), chunk_bytes=4096)
        worker.submit(job)
        wire = []
        while (msg := job.out.get(timeout=120)) is not DONE:
            assert not isinstance(msg, Exception), msg
            wire.append(msg)
    finally:
        worker.stop()
    policy = tier_policy(model.config)
    compressed = sum(prompt * model.config.num_key_value_heads * (t.k_dim + t.v_dim) * 4 for t in policy.layers)
    tier_rows = (policy.sinks + policy.recent) * model.config.num_key_value_heads * 4
    assert job.kv_bytes == compressed + tier_rows * sum(t.tier_k + t.tier_v for t in policy.layers)
    decode = _cache(model)
    receiver, land = receive_into(decode, "s0", decode.schedule([("s0", prompt)]).slot_mapping)
    tier_chunks = [raw for raw in wire if decode_chunk(parse_prefill_response(raw)).tier]
    for raw in wire:
        if raw is not tier_chunks[-1]:
            receiver.write(decode_chunk(parse_prefill_response(raw)))
    with pytest.raises(KvTransferError, match="without the token tier's rows"):
        receiver.check_complete()  # the last tier chunk is still missing
    receiver.write(decode_chunk(parse_prefill_response(tier_chunks[-1])))
    receiver.check_complete()
    assert receiver.bytes_received == job.kv_bytes
    land()
    got = _run(model, decode, tokens[:, prompt:], [[(0, 1)]] * 5)[0]  # positions 40..44 from the landed cache
    assert (got - dense[prompt:]).abs().max().item() < 1e-4


def test_tier_chunks_for_a_model_without_a_tier_or_outside_the_tier_are_refused(tiered_of, bundled):
    model = tiered_of("fold", 2, 4)
    t = tier_policy(model.config).layers[0]
    rows = lambda n, w: torch.zeros(n, model.config.num_key_value_heads, w)  # noqa: E731
    plain = paged_cache(layer_shapes(bundled.config), CacheConfig(num_blocks=4), torch.float32)
    receiver, _ = receive_into(plain, "p", plain.schedule([("p", 20)]).slot_mapping)
    chunk = next(encode_layer(0, rows(2, t.tier_k), rows(2, t.tier_v), 0, 1 << 20))
    chunk.tensor = TIER_KEY
    with pytest.raises(KvTransferError, match="keeps none") as err:
        receiver.write(decode_chunk(chunk))
    assert err.value.code.name == "FAILED_PRECONDITION"
    tiered = _cache(model)
    receiver, _ = receive_into(tiered, "s", tiered.schedule([("s", 20)]).slot_mapping)
    inside = next(encode_layer_wire(0, rows(2, t.tier_k), rows(2, t.tier_v), 0, 1 << 20, tier=True))
    receiver.write(decode_chunk(parse_prefill_response(inside)))  # tokens 0, 1: the sinks
    outside = next(encode_layer_wire(0, rows(2, t.tier_k), rows(2, t.tier_v), 5, 1 << 20, tier=True))
    with pytest.raises(KvTransferError, match="outside the prompt's sinks and recent window") as err:
        receiver.write(decode_chunk(parse_prefill_response(outside)))
    assert err.value.code.name == "DATA_LOSS"


def test_forward_bench_sizes_a_tiered_cache_with_its_borrowed_blocks(tiered_of, bundled):
    """`zeroc bench forward` on a tiered model: the cache holds the tier's blocks (sequence_blocks)."""
    from zeroc.bench.forward import bench_decode, bench_prefill

    model = tiered_of("fold", 4, 16)
    loaded = LoadedModel(model, model.config, bundled.tokenizer, bundled.path)
    assert bench_prefill(loaded, 40, repeats=1).tokens == 40
    assert bench_decode(loaded, batch_size=2, context=24, steps=3).tokens == 2


@torch.inference_mode()
def test_every_engine_step_of_a_tiered_model_reads_the_host_once(tiered_of, bundled):
    """Prompts, chunked-prefill-plus-decode steps and decode-only steps of a tiered model each read tensor values
    to the host once (the sampled ids): the tier finds its rows through the device's copy of the borrowed ids and
    sizes everything from the batch's host fields, where it read the device several times in every layer.
    Its tokens are those of each request run alone, through the model's dense tiered forward."""
    from zeroc.bench.step_costs import count_syncs
    from zeroc.engine import Engine
    from zeroc.sampling import SamplingParams

    model = tiered_of("rotate", 2, 8)
    loaded = LoadedModel(model, model.config, bundled.tokenizer, bundled.path)
    engine = Engine(loaded, CacheConfig(16, 64), SchedulerConfig(max_num_batched_tokens=24))
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (7, 40)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]  # the second is chunked in beside the first's decodes
    reads, mixes, got = [], [], {i: [] for i in ids}
    while engine.has_unfinished():
        with count_syncs(engine.device) as n:
            outs = engine.step()
        reads.append(n[0])
        mixes.append(engine.last_step_tokens)
        for o in outs:
            got[o.request_id].extend(o.token_ids)
    assert set(reads) == {1}
    assert mixes[0] > 1 and 1 < max(mixes[1:]) and min(mixes) == 1  # prompts, mixed steps and decode-only steps
    for i, prompt in zip(ids, prompts):  # greedy by hand through the dense forward
        tokens = list(prompt)
        for _ in range(params.max_new_tokens):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
        assert got[i] == tokens[len(prompt):]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    assert (engine.cache.pools.tier_ids == engine.cache.pools.trash).all()
