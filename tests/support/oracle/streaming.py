"""Streaming perplexity through a dense oracle policy (the test oracle of `zeroc eval ppl --streaming`).

Each oracle policy keeps dense per-layer tensors and the model runs through
`Transformer.forward_attend`, the same layers, RoPE and projections as the paged path, only attention
is the policy's. Scoring is `zeroc.eval.perplexity`'s: windows of `ctx` tokens, every token after
the first of a window predicted from the ones before it in that window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from zeroc.eval.perplexity import PerplexityResult

from zeroc.data import windows_of
from zeroc.model import Transformer
from oracle.base import KVPolicy, reference_bits


SETTLED = 128  # kv_fraction_max ignores the first positions, where floors (sinks, 1 token) dominate


@dataclass(frozen=True)
class PolicyPerplexity:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    ctx: int
    policy: str
    budget: float
    kv_fraction_mean: float  # stored KV bits / the uncompressed model's fp16 bits, mean over scored steps
    kv_fraction_max: float | None  # the largest such fraction at positions >= SETTLED (None: no such position)
    mode: str = "streaming"

    def to_dict(self) -> dict:
        return asdict(self)

    def as_result(self) -> PerplexityResult:
        return PerplexityResult(self.perplexity, self.nll, self.tokens, self.windows, self.ctx, self.mode)


def _groups(wins: list[Tensor], batch_size: int) -> list[list[Tensor]]:
    # Sequences in a group advance in lockstep, so a group holds windows of one length.
    by_len: dict[int, list[Tensor]] = {}
    for w in wins:
        by_len.setdefault(w.numel(), []).append(w)
    return [ws[i: i + batch_size] for ws in by_len.values() for i in range(0, len(ws), batch_size)]


@torch.inference_mode()
def perplexity_with_policy(model: Transformer, tokens: Tensor, ctx: int, policy: KVPolicy, batch_size: int = 16,
                           progress: bool = True) -> PolicyPerplexity:
    """Feed the windows of `tokens` ([n]) token by token; `policy` owns every layer's cache."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    policy.prepare(model)
    wins = windows_of(tokens, ctx)
    device = next(model.parameters()).device
    layers = range(model.config.num_hidden_layers)
    full_per_token = reference_bits(model, 1)  # of the source model's widths, also for a ZeroC model
    nll_sum, count, frac_sum, frac_max = 0.0, 0, 0.0, None
    bar = tqdm(total=sum(w.numel() - 1 for w in wins), desc=f"ppl (streaming, {policy.label} @ {policy.budget})",
               unit="tok", disable=not progress)
    for group in _groups(wins, batch_size):
        batch = torch.stack(group).to(device)  # [b, len]
        caches = [policy.new_cache(model, i, batch.shape[0]) for i in layers]
        for t in range(batch.shape[1] - 1):
            def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, t: int = t) -> Tensor:
                # q: [b, heads, dq]; k: [b, kv_heads, dq]; v: [b, kv_heads, dv]
                return caches[layer].step(q, k, v, scale, t)

            positions = torch.full((batch.shape[0],), t, dtype=torch.long, device=device)
            logits = model.forward_attend(batch[:, t], positions, attend).float()  # [b, vocab]
            nll_sum += F.cross_entropy(logits, batch[:, t + 1], reduction="sum").item()
            count += batch.shape[0]
            frac = sum(c.stored_bits() for c in caches) / (full_per_token * (t + 1))
            frac_sum += frac * batch.shape[0]
            if t + 1 >= SETTLED:
                frac_max = frac if frac_max is None else max(frac_max, frac)
            bar.update(batch.shape[0])
    bar.close()
    mean = nll_sum / count
    return PolicyPerplexity(math.exp(mean), mean, count, len(wins), ctx, policy.label, policy.budget,
                            frac_sum / count, frac_max)
