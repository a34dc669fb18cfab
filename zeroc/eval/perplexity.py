"""Perplexity on a text file, full-pass or streamed token by token through the paged cache.

Both modes score the same tokens: the text is tokenized once (with <s> at the start) and
cut into non-overlapping windows of `ctx` tokens; inside each window every token after the
first is predicted from the tokens before it in that window. perplexity = exp(mean NLL).

Streaming runs the cache `zeroc serve` runs: a `CacheConfig` naming a KV method
(`zeroc.policies.registry`) gets that method's store, so a method's perplexity is its serving
quality. The KV it holds comes from the method's byte maths (`KVMethod.held_bits`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from zeroc.config import CacheConfig
from zeroc.data import windows_of
from zeroc.caches import cache_policy, paged_cache, sequence_blocks
from zeroc.model import Transformer
from zeroc.kv_cache import layer_shapes
from zeroc.policies.base import reference_bits

SETTLED = 128  # kv_fraction_max ignores the first positions, where floors (sinks, 1 token) dominate


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int
    ctx: int
    mode: str  # "full" | "streaming"
    policy: str = "none"  # the KV method's registry name
    kv_fraction_mean: float = 1.0  # KV bits held / the uncompressed fp16 cache's, mean over scored steps
    kv_fraction_max: float | None = 1.0  # the largest such fraction at positions >= SETTLED (None: none there)

    def to_dict(self) -> dict:
        return asdict(self)


def _result(nll_sum: float, count: int, windows: int, ctx: int, mode: str) -> PerplexityResult:
    mean = nll_sum / count
    return PerplexityResult(math.exp(mean), mean, count, windows, ctx, mode)


def held_fraction(model: Transformer, cache: CacheConfig, lengths: list[int]) -> tuple[float, float | None]:
    """(mean, max at positions >= SETTLED) of the KV fraction the cache `cache` holds over the scored steps of
    windows of `lengths` tokens: after step t a window holds t tokens (t = 1 .. length - 1)."""
    cfg = model.config
    policy = cache_policy(cache, cfg)
    shapes = layer_shapes(cfg)
    frac = {}
    for t in range(1, max(lengths)):
        held = (policy.held_bits(shapes, t) if policy is not None
                else float(t * sum(s.kv_heads * (s.k_dim + s.v_dim) for s in shapes) * 16))
        frac[t] = held / reference_bits(cfg, t)
    steps = [frac[t] for n in lengths for t in range(1, n)]
    settled = [f for t, f in frac.items() if t >= SETTLED]
    return sum(steps) / len(steps), (max(settled) if settled else None)


@torch.inference_mode()
def perplexity_full(model: Transformer, tokens: Tensor, ctx: int, batch_size: int = 4,
                    progress: bool = True) -> PerplexityResult:
    """One dense causal forward per window."""
    wins = windows_of(tokens, ctx)
    device = next(model.parameters()).device
    # Windows of equal length share a forward; only the last window can be shorter.
    groups = [wins[i: i + batch_size] for i in range(0, len(wins), batch_size)]
    groups = [g for group in groups for g in ([group] if len({w.numel() for w in group}) == 1
                                               else [group[:-1], group[-1:]])]
    nll_sum, count = 0.0, 0
    for group in tqdm(groups, desc="ppl (full)", unit="batch", disable=not progress):
        batch = torch.stack(group).to(device)  # [b, len]
        logits = model(batch[:, :-1]).float()  # [b, len-1, vocab]
        nll_sum += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return _result(nll_sum, count, len(wins), ctx, "full")


@torch.inference_mode()
def perplexity_streaming(model: Transformer, tokens: Tensor, ctx: int, batch_size: int = 16,
                         block_size: int = 16, progress: bool = True, cache: CacheConfig | None = None
                         ) -> PerplexityResult:
    """Feed windows token by token through the paged cache `cache` names (default: the plain one with
    `block_size`; its num_blocks is replaced by what `batch_size` windows need), `batch_size` at a time."""
    cfg = model.config
    wins = windows_of(tokens, ctx)
    param = next(model.parameters())
    cache = cache or CacheConfig(block_size=block_size)
    blocks_per_win = sequence_blocks(cfg, cache.block_size, ctx, cache, param.dtype)  # borrowed blocks included
    cache_cfg = replace(cache, num_blocks=blocks_per_win * min(batch_size, len(wins)), num_bytes=0,
                        memory_fraction=0.0)  # an exact count: the other capacities off
    kv = paged_cache(layer_shapes(cfg), cache_cfg, param.dtype, param.device, model=model)
    nll_sum, count = 0.0, 0
    bar = tqdm(total=sum(w.numel() - 1 for w in wins), desc="ppl (streaming)", unit="tok", disable=not progress)
    for first in range(0, len(wins), batch_size):
        group = wins[first: first + batch_size]
        for t in range(max(w.numel() for w in group) - 1):
            live = [(i, w) for i, w in enumerate(group) if w.numel() - 1 > t]
            batch = kv.schedule([(f"w{first + i}", 1) for i, _ in live])
            new = torch.stack([w[t] for _, w in live]).to(param.device)
            logits = model.forward_paged(new, batch.positions, batch, kv).float()  # [live, vocab]
            target = torch.stack([w[t + 1] for _, w in live]).to(param.device)
            nll_sum += F.cross_entropy(logits, target, reduction="sum").item()
            count += len(live)
            bar.update(len(live))
        for i in range(len(group)):
            kv.free(f"w{first + i}")
    bar.close()
    mean, peak = held_fraction(model, cache, [w.numel() for w in wins])
    return replace(_result(nll_sum, count, len(wins), ctx, "streaming"), policy=cache.kv_policy,
                   kv_fraction_mean=mean, kv_fraction_max=peak)
