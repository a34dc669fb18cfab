"""Perplexity on a text file, full-pass or streamed token by token through the paged cache.

Both modes score the same tokens: the text is tokenized once (with <s> at the start) and
cut into non-overlapping windows of `ctx` tokens; inside each window every token after the
first is predicted from the tokens before it in that window. perplexity = exp(mean NLL).

Streaming runs the cache `zeroc serve` runs: a `CacheConfig` naming a KV method
(`zeroc.policies.registry`) gets that method's store, so a method's perplexity is its serving
quality. The KV it holds comes from the method's byte maths (`KVMethod.held_bits`).

Prefill-then-score (`perplexity_prefill`, the protocol kvpress and most KV-compression papers report):
windows of `prefill + score` tokens; the first `prefill` tokens are prefilled through the method's
cache, which compresses them, then the next `score` tokens are scored teacher-forced through the same
cache. Only tokens with a long context behind them are scored. In this cache an eviction method holds
its budget at every position, the continuation's included (kvpress keeps the continuation whole), so
the protocol is at least as strict for eviction as kvpress's; the other methods encode on write alike.

Every result keeps its mean NLL per window, so two methods on the same text can be compared window by
window (`zeroc.eval.paired`).
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
    mode: str  # "full" | "streaming" | "prefill"
    policy: str = "none"  # the KV method's registry name
    kv_fraction_mean: float = 1.0  # KV bits held / the uncompressed fp16 cache's, mean over scored steps
    kv_fraction_max: float | None = 1.0  # the largest such fraction at positions >= SETTLED (None: none there)
    window_nll: tuple[float, ...] = ()  # mean NLL per window (paired comparisons); not in to_dict
    window_tokens: tuple[int, ...] = ()  # tokens scored per window

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["window_nll"], out["window_tokens"]
        return out


def _result(nll_sum: float, count: int, windows: int, ctx: int, mode: str,
            per_window: list[tuple[float, int]] | None = None) -> PerplexityResult:
    mean = nll_sum / count
    per_window = per_window or []
    return PerplexityResult(math.exp(mean), mean, count, windows, ctx, mode,
                            window_nll=tuple(s / n for s, n in per_window), window_tokens=tuple(n for _, n in per_window))


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
    per_window = torch.zeros(len(wins), dtype=torch.float64)
    bar = tqdm(total=sum(w.numel() - 1 for w in wins), desc="ppl (streaming)", unit="tok", disable=not progress)
    for first in range(0, len(wins), batch_size):
        group = wins[first: first + batch_size]
        for t in range(max(w.numel() for w in group) - 1):
            live = [(i, w) for i, w in enumerate(group) if w.numel() - 1 > t]
            batch = kv.schedule([(f"w{first + i}", 1) for i, _ in live])
            new = torch.stack([w[t] for _, w in live]).to(param.device)
            logits = model.forward_paged(new, batch.positions, batch, kv).float()  # [live, vocab]
            target = torch.stack([w[t + 1] for _, w in live]).to(param.device)
            nll = F.cross_entropy(logits, target, reduction="none").double().cpu()  # [live]
            per_window.index_add_(0, torch.tensor([first + i for i, _ in live]), nll)
            nll_sum += nll.sum().item()
            count += len(live)
            bar.update(len(live))
        for i in range(len(group)):
            kv.free(f"w{first + i}")
    bar.close()
    mean, peak = held_fraction(model, cache, [w.numel() for w in wins])
    sums = list(zip(per_window.tolist(), [w.numel() - 1 for w in wins]))
    return replace(_result(nll_sum, count, len(wins), ctx, "streaming", sums), policy=cache.kv_policy,
                   kv_fraction_mean=mean, kv_fraction_max=peak)


@torch.inference_mode()
def perplexity_prefill(model: Transformer, tokens: Tensor, prefill: int, score: int, batch_size: int = 8,
                       cache: CacheConfig | None = None, chunk: int = 512, progress: bool = True) -> PerplexityResult:
    """Prefill `prefill` tokens of each full window of `prefill + score` through the cache `cache` names
    (default: the plain one), then score the next `score` tokens teacher-forced; ValueError if the text
    holds no full window."""
    if prefill < 1 or score < 1:
        raise ValueError(f"prefill and score must be >= 1, got {prefill} and {score}")
    span = prefill + score
    wins = [w for w in windows_of(tokens, span) if w.numel() == span]
    if not wins:
        raise ValueError(f"the text holds no full window of prefill + score = {span} tokens")
    cfg, param = model.config, next(model.parameters())
    cache = cache or CacheConfig()
    blocks = sequence_blocks(cfg, cache.block_size, span, cache, param.dtype, step=max(chunk, score - 1))
    per_window = []
    for first in tqdm(range(0, len(wins), batch_size), desc="ppl (prefill)", unit="batch", disable=not progress):
        group = wins[first: first + batch_size]
        kv = paged_cache(layer_shapes(cfg), replace(cache, num_blocks=blocks * len(group), num_bytes=0), param.dtype,
                         param.device, model=model)
        # the prompt, in chunks (its last logits predict the first scored token), then the continuation at once
        pieces = [(a, min(a + chunk, prefill)) for a in range(0, prefill, chunk)] + [(prefill, span - 1)] * (score > 1)
        logits = []
        for a, b in pieces:
            batch = kv.schedule([(f"w{i}", b - a) for i in range(len(group))])
            x = torch.cat([w[a:b] for w in group]).to(param.device)
            last = b == prefill
            out = model.forward_paged(x, batch.positions, batch, kv, batch.last_token_indices if last else None)
            if last or a == prefill:
                logits.append(out.float().view(len(group), -1, out.shape[-1]))
        pred = torch.cat(logits, dim=1)  # [group, score, vocab]
        target = torch.stack([w[prefill:] for w in group]).to(param.device)  # [group, score]
        nll = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view(len(group), -1)
        per_window += [(x, score) for x in nll.double().sum(dim=1).tolist()]
    total = sum(x for x, _ in per_window)
    mean, peak = held_fraction(model, cache, [span])
    return replace(_result(total, score * len(wins), len(wins), span, "prefill", per_window), policy=cache.kv_policy,
                   kv_fraction_mean=mean, kv_fraction_max=peak)
