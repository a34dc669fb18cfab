"""Speculative decoding by n-gram lookup (vLLM's "ngram" method, prompt lookup decoding): no draft model.

A request's next tokens are guessed from its own text: where its last n tokens (n from `ngram_max` down to
`ngram_min`) occurred before, the k tokens that followed that occurrence are the draft. The engine runs the last
token and the draft through the model in one step, as a short chunk of the sequence, samples the token after each
as the request samples, and keeps the draft as far as those samples agree with it, plus the sample after the last
token kept: 1 to k + 1 tokens a step (`accept`); a greedy request's are exactly plain greedy decoding's. Where text
repeats (code being edited, a document being quoted or summarised, structured records) most drafts hold; where it
does not, a step costs a few more rows than a decode row.

Sampled requests speculate too. Each draft token's row samples as the request does (temperature, top-k, top-p,
min_p), and the draft is kept while those samples equal it. That is rejection sampling for a draft that is one
token for sure (q = one-hot(d)): a draft token d is kept with probability p(d) = min(1, p(d) / q(d)), and the sample
that differs from it is p's, given that it is not d, which is the residual (p - q)+ renormalized. So the tokens
follow the model's distribution exactly. A seeded request draws one number per token as it would without
speculating, and gives back the draws of the draft tokens it does not keep (`rewind`). Its tokens are those it
samples without speculation, in any batch.

Log-probabilities come from each kept token's own row (the draft rows' logits, then the row after the whole draft).

Which requests speculate (`eligible`): those whose logits nothing else changes (no penalties, logit bias, guide or
min_tokens) and that do not score their prompt (prompt log-probabilities), on caches whose slots a later step may
overwrite (plain pools: a KV policy's stored form and a token tier cannot take back a draft's rows).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.sampling import SamplingBatch, SamplingParams

if TYPE_CHECKING:
    from zeroc.sequence import Sequence


def eligible(p: SamplingParams) -> bool:
    """Whether a request's tokens come from its bare logits and its sampling parameters alone (so a draft can be
    checked against samples of the draft rows' logits), and its prompt is not scored."""
    return not p.penalized and p.guide is None and p.prompt_logprobs is None and p.min_tokens == 0


@dataclass(frozen=True)
class NgramProposer:
    """Drafts of at most `k` tokens from the sequence's own earlier text (k = 0: no speculation)."""

    k: int
    ngram_min: int = 2
    ngram_max: int = 4

    def __post_init__(self) -> None:
        if self.k < 0 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"speculation needs k >= 0 and 1 <= ngram_min <= ngram_max, got k={self.k}, "
                             f"ngram {self.ngram_min}..{self.ngram_max}")

    def propose(self, ids: list[int], limit: int) -> list[int]:
        """The draft after `ids` (at most min(k, limit) tokens): what followed the latest earlier occurrence of
        its longest matching suffix; [] where none occurs."""
        limit = min(self.k, limit)
        if limit <= 0 or len(ids) <= self.ngram_min:
            return []
        data = array("I", ids).tobytes()  # 4 bytes a token: bytes.rfind searches in C
        for n in range(min(self.ngram_max, len(ids) - 1), self.ngram_min - 1, -1):
            pattern, end = data[-4 * n:], len(data) - 4  # an occurrence ending before the last token
            while (at := data.rfind(pattern, 0, end)) >= 0:
                if at % 4 == 0:
                    start = at // 4 + n
                    return ids[start: start + limit]
                end = at + len(pattern) - 1  # a match across token boundaries: look further back
        return []


    def plan(self, decoding: list[Sequence], need: int, cache, max_positions: int, budget: int
             ) -> tuple[list[Sequence], list[tuple[Sequence, list[int]]], int]:
        """Take the speculating sequences out of a step's decode rows, each with a draft where `cache` (a
        PagedKVCache, after the decode rows' `need` blocks) has room for it and the step's token `budget` (what is
        left of max_num_batched_tokens after one token a decode row) for its tokens: -> (the other decode rows,
        (sequence, draft) pairs, the blocks all of them take). A speculating sequence's last token is on the host
        (its step before was waited for); one with a token in flight still decodes as a plain row."""
        if not self.k:
            return decoding, [], need
        rows, drafted = [], []
        for seq in decoding:
            if not seq.speculative or seq.pending:
                rows.append(seq)
                continue
            left = min(seq.params.max_new_tokens - len(seq.output_ids), max_positions - seq.num_tokens, budget + 1) - 1
            draft = self.propose(seq.all_ids, left)
            more = cache.blocks_needed(seq.request_id, 1 + len(draft)) - cache.blocks_needed(seq.request_id, 1)
            if more > cache.num_free_blocks - need:
                draft, more = [], 0
            drafted.append((seq, draft))
            need += more
            budget -= len(draft)
        return rows, drafted, need


@dataclass
class SpecStats:
    """What speculation did since start, for the service's metrics (vLLM's spec_decode counters): steps with a
    draft, draft tokens checked, draft tokens kept. The mean tokens a drafting step gives: 1 + accepted / drafts."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def record(self, draft: list[int], kept: list[int]) -> None:
        """A step's `draft` and the tokens `accept` kept of it and after it."""
        if draft:
            self.drafts += 1
            self.draft_tokens += len(draft)
            self.accepted_tokens += len(kept) - 1


def draft_sampling(drafted: list[tuple[Sequence, list[int]]], vocab: int, device: torch.device,
                   last: SamplingBatch | None) -> SamplingBatch:
    """How a step's draft rows [sum of the drafts' lengths] sample: each as its request does, a seeded one from its
    own generator in the order of its tokens. The rows are the positions after a request's last token and after
    each draft token but the last; its row in the step's main batch, after the whole draft, draws after them.
    `last`: the step before's, reused where the rows sample alike."""
    params = [seq.params for seq, draft in drafted for _ in draft]
    return SamplingBatch.build(params, [seq.generator for seq, draft in drafted for _ in draft], vocab, device, last)


def marks(drafted: list[tuple[Sequence, list[int]]]) -> dict[int, Tensor]:
    """Each seeded request's generator state before a step's draws (by id() of its sequence), where it drafts."""
    return {id(seq): seq.generator.get_state() for seq, draft in drafted if draft and seq.generator is not None}


def rewind(generator: torch.Generator, mark: Tensor, used: int) -> None:
    """Set a seeded request's generator to where `used` draws from `mark` leave it: one draw for each token it kept,
    each as a decode step's (zeroc/sampling.py `_uniforms`), as if it had drawn for no draft token it dropped."""
    generator.set_state(mark)
    for _ in range(used):
        torch.empty(1, device=generator.device).uniform_(generator=generator)


def accept(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens a verified draft gives: targets[i] is the token sampled (greedy's: the top one) after the last
    one and draft[:i] (len(draft) + 1 of them). Those up to and including the first that differs from the draft's,
    or all of them where the whole draft holds."""
    for i, (d, t) in enumerate(zip(draft, targets)):
        if d != t:
            return targets[: i + 1]
    return targets[: len(draft) + 1]
