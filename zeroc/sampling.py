"""Sampling parameters and the batched sampler: one pass on the device for every row of a step.

`sample_batch` picks one token per row with each row's own temperature, top-k and top-p (greedy rows
take the argmax). Random rows race exponential noise (argmax of probs / E, E ~ Exp(1), which draws
from probs exactly as the Gumbel-max trick does). A seeded request draws its noise from its own
generator, so its tokens do not depend on which other requests share its batch; unseeded rows share
one generator and one draw. A row whose logits or probabilities are not finite gets id -1, so the
caller finishes that request alone; the ids come to the host in one copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from zeroc.device import host_to_device

FAILED = -1  # the id `sample_batch` gives a row whose logits or probabilities are not finite


# Below this a temperature is refused rather than clamped: dividing logits by a subnormal
# temperature overflows to inf and the softmax to NaN. 0 (greedy) is the way to ask for argmax.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
# Bounded work per request: each stop string is searched in the text after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 means greedy; otherwise it must
    lie in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text returned ends before the first match
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):  # NaN fails both
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                             f"got {t!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be non-empty and at most {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                             "are allowed")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG on `device` for a seeded random request, so it samples the same tokens in any batch;
    None for greedy and unseeded requests (those draw from the sampler's shared generator)."""
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (B rows), plus host-side flags that
    let the sampler skip the sort when no row cuts its support."""

    # None when every row is greedy: an all-greedy step copies nothing to the device.
    temperature: Tensor | None  # [B] float32; 1.0 on greedy rows (unused there)
    top_k: Tensor | None  # [B] int64 in [1, vocab]; vocab means no cut
    top_p: Tensor | None  # [B] float32 in (0, 1]
    greedy: Tensor | None  # [B] bool
    generators: tuple[torch.Generator | None, ...]  # per row; None: the shared generator (or greedy)
    random_rows: tuple[int, ...]  # rows that sample
    cuts: bool  # any random row with top-k or top-p

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab: int,
              device: torch.device) -> "SamplingBatch":
        random_rows = tuple(i for i, p in enumerate(params) if not p.greedy)
        if not random_rows:
            return cls(None, None, None, None, tuple(generators), (), False)
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        cuts = any(top_k[i] < vocab or params[i].top_p < 1.0 for i in random_rows)
        return cls(
            temperature=host_to_device([p.temperature or 1.0 for p in params], torch.float32, device),
            top_k=host_to_device(top_k, torch.long, device),
            top_p=host_to_device([p.top_p for p in params], torch.float32, device),
            greedy=host_to_device([p.greedy for p in params], torch.bool, device),
            generators=tuple(generators), random_rows=random_rows, cuts=cuts)


def _cut_support(scores: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask (to -inf) what top-k and then top-p drop, per row. scores: [B, V]; top_k, top_p: [B]."""
    sorted_scores, _ = torch.sort(scores, dim=-1, descending=True)
    kth = sorted_scores.gather(1, (top_k - 1).unsqueeze(1))  # [B, 1]
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    # Drop a token once the mass before it already reaches top_p; the first token always stays, so the
    # kept tokens are a prefix of the sorted order and its last score is the row's threshold.
    # (clamped: a row of NaN keeps none; it fails anyway, and an index of -1 would fault on the device)
    kept = ((probs.cumsum(-1) - probs) < top_p.unsqueeze(1)).sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    threshold = sorted_scores.gather(1, kept - 1)
    return scores.masked_fill(scores < torch.maximum(kth, threshold), float("-inf"))


def _noise(shape: tuple[int, int], batch: SamplingBatch, device: torch.device,
           shared: torch.Generator | None) -> Tensor:
    """Exp(1) noise [B, V]: a seeded row's from its own generator, the other rows' in one shared draw."""
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=shared)
    for row in batch.random_rows:
        gen = batch.generators[row]
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise


def sample_batch(logits: Tensor, batch: SamplingBatch, shared: torch.Generator | None = None) -> Tensor:
    """One token id per row of logits: [B, V] -> [B] int64 on the device; FAILED where a row's logits
    or probabilities are not finite. Causes no device sync."""
    # greedy ids and the finiteness check in the logits' own dtype (bf16 converts to fp32 exactly, so the argmax
    # is the same): an all-greedy step copies no [B, V] tensor
    ids = torch.argmax(logits, dim=-1)
    bad = ~torch.isfinite(logits).all(dim=-1)
    if batch.random_rows:
        scores = logits.float() / batch.temperature.unsqueeze(1)
        if batch.cuts:
            scores = _cut_support(scores, batch.top_k, batch.top_p)
        probs = torch.softmax(scores, dim=-1)
        bad |= ~torch.isfinite(probs).all(dim=-1) & ~batch.greedy
        sampled = torch.argmax(probs / _noise(tuple(logits.shape), batch, logits.device, shared), dim=-1)
        ids = torch.where(batch.greedy, ids, sampled)
    return ids.masked_fill(bad, FAILED)
