"""Two ways to run one prompt under a KV policy: the streaming evaluator (the oracle) and the paged
serving cache, each returning the logits of every position it computed and its greedy tokens; and
a prompt's KV from a prefill worker landed in a decode engine (disaggregated, in one process)."""

from __future__ import annotations

import torch
from torch import Tensor

from prefill_service.worker import DONE, PrefillJob, PrefillWorker
from zeroc.config import CacheConfig, SchedulerConfig
from zeroc.engine import Engine
from zeroc.caches import paged_cache
from zeroc.kv_cache import LayerShape, PagedKVCache, layer_shapes
from zeroc.kv_transfer import decode_chunk
from zeroc.model import Transformer
from oracle import oracle_of
from oracle.base import KVPolicy
from zeroc.sampling import SamplingParams
from zeroc.transport.landing import receive_into
from zeroc.v1 import prefill_pb2


@torch.inference_mode()
def stream(model: Transformer, policy: KVPolicy, ids: list[int], steps: int) -> tuple[Tensor, list[int]]:
    """Token by token through the evaluator's per-layer caches -> (logits [len(ids) + steps - 1, vocab],
    prompt + `steps` greedy tokens)."""
    caches = [policy.new_cache(model, i, 1) for i in range(model.config.num_hidden_layers)]
    tokens, logits = list(ids), []
    for t in range(len(ids) + steps - 1):
        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, t: int = t) -> Tensor:
            return caches[layer].step(q, k, v, scale, t)

        row = model.forward_attend(torch.tensor([tokens[t]]), torch.tensor([t]), attend)[0]
        logits.append(row)
        if t >= len(ids) - 1:
            tokens.append(int(row.argmax()))
    return torch.stack(logits), tokens


@torch.inference_mode()
def serve(model: Transformer, cache: PagedKVCache, ids: list[int], steps: int, chunks: list[int],
          seq: str = "s") -> tuple[Tensor, list[int]]:
    """The prompt in `chunks` (prefill steps of those sizes), then greedy decode steps through the
    paged cache -> the same pair as `stream`."""
    assert sum(chunks) == len(ids)
    tokens, logits, done = list(ids), [], 0
    for n in chunks:
        batch = cache.schedule([(seq, n)])
        logits.append(model.forward_paged(torch.tensor(tokens[done:done + n]), batch.positions, batch, cache))
        done += n
    tokens.append(int(logits[-1][-1].argmax()))
    for _ in range(steps - 1):
        batch = cache.schedule([(seq, 1)])
        logits.append(model.forward_paged(torch.tensor(tokens[-1:]), batch.positions, batch, cache))
        tokens.append(int(logits[-1][-1].argmax()))
    return torch.cat(logits), tokens


def policy_cache(loaded, **cfg) -> PagedKVCache:
    return paged_cache(layer_shapes(loaded.config), CacheConfig(**cfg), torch.float32, model=loaded.model)


def check_serving_is_the_policy(loaded, method, ids: list[int], steps: int, chunks: list[list[int]],
                                atol: float = 1e-4, **cache_cfg) -> None:
    """Serving `method` through one paged cache (`cache_cfg`: CacheConfig fields) gives the dense oracle's logits
    and greedy tokens for every prompt chunking in `chunks`, far closer to them than plain attention is, and each
    freed sequence leaves every block behind."""
    want_logits, want_tokens = stream(loaded.model, oracle_of(method), ids, steps)
    plain, _ = serve(loaded.model, policy_cache(loaded, block_size=cache_cfg["block_size"], num_blocks=16), ids,
                     steps, [len(ids)])
    gap = (want_logits - plain).abs().max()  # how far the policy moves the logits
    assert gap > 1e-4
    cache = policy_cache(loaded, **cache_cfg)
    for split in chunks:
        logits, tokens = serve(loaded.model, cache, ids, steps, split)
        torch.testing.assert_close(logits, want_logits, atol=atol, rtol=1e-4)
        assert (logits - want_logits).abs().max() < gap / 100  # serving is the policy, not plain attention
        assert tokens == want_tokens
        cache.free("s")
        assert cache.num_free_blocks == cache.num_blocks


def prefill_chunks(loaded, cache: CacheConfig, ids: list[int]) -> list:
    """The KV chunks a prefill worker running `cache`'s policy streams for `ids` (serialized and parsed back)."""
    worker = PrefillWorker(loaded, cache, SchedulerConfig())
    try:
        job = PrefillJob("p", ids, 4096)
        worker.submit(job)
        chunks = []
        while (item := job.out.get(timeout=120)) is not DONE:
            assert not isinstance(item, Exception), item
            chunks.append(prefill_pb2.PrefillResponse.FromString(item).chunk)  # chunks arrive serialized
        return chunks
    finally:
        worker.stop()


def land_prompt(loaded, engine: Engine, cfg: CacheConfig, ids: list[int]) -> None:
    """Disaggregated in one process: a prefill worker under `cfg`'s policy computes the KV of all but the
    last prompt token, which lands (encoded on arrival) in `engine`'s cache as request "r"."""
    slots = engine.reserve("r", len(ids) - 1)
    receiver, land = receive_into(engine.cache, "r", slots)
    for chunk in prefill_chunks(loaded, cfg, ids[:-1]):
        receiver.write(decode_chunk(chunk))
    receiver.check_complete()
    land()


def decode_landed(engine: Engine, ids: list[int], params) -> list[int]:
    """Generate for the prompt `land_prompt` landed -> its tokens (the engine drained)."""
    engine.add_request(ids, params, "r", cached_tokens=len(ids) - 1)
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.token_ids]
    return out


def check_landed_is_colocated(loaded, cfg: CacheConfig, ids: list[int], held_blocks: int | None = None) -> None:
    """Disaggregated equals colocated: a prompt whose KV a prefill worker computed under `cfg`'s policy lands in a
    decode engine (holding `held_blocks` blocks, when given) and decodes the greedy tokens the engine gets by
    itself, then frees every block."""
    direct = Engine(loaded, cfg).generate([ids], GREEDY)[0]
    engine = Engine(loaded, cfg)
    land_prompt(loaded, engine, cfg, ids)
    if held_blocks is not None:
        assert engine.cache.num_blocks - engine.cache.num_free_blocks == held_blocks
    assert decode_landed(engine, ids, GREEDY) == direct.token_ids
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


# The bundled model's cache geometry, and greedy sampling of a dozen tokens, for the serving-policy tests.
BUNDLED = [LayerShape(2, 64, 64)] * 6
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
