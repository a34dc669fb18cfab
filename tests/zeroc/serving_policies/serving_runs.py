"""Two ways to run one prompt under a KV policy: the streaming evaluator (the oracle) and the paged
serving cache, each returning the logits of every position it computed and its greedy tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from zeroc.config import CacheConfig
from zeroc.kv_cache import PagedKVCache, layer_shapes
from zeroc.model import Transformer
from zeroc.policies import KVPolicy


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
    return PagedKVCache(layer_shapes(loaded.config), CacheConfig(**cfg), torch.float32, model=loaded.model)
