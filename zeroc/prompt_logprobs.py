"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`): each prompt token's log-probability given the
tokens before it, and the most likely tokens' at its position, from the prefill's own hidden states.

What scorers need (lm-evaluation-harness's loglikelihood tasks send `echo` with `logprobs` to /v1/completions):
a prompt of P tokens gets P - 1 entries, for tokens 2..P (the first has no context). The prefill projects to
logits only each sequence's last row; a step whose admitted chunks ask for prompt log-probabilities projects their
other rows too (`PromptRows.logits_indices`), scores them beside the sampled ids, and the rows ride to the host in
the step's one copy (`PromptRows.pack`), so the engine's one device->host copy per step holds. The extra logits are
[rows, vocab] in the model's dtype, at most `max_num_batched_tokens` rows a step; their log-softmax runs SCORE_ROWS
rows at a time, so its fp32 temporaries stay [SCORE_ROWS, vocab] however long the chunk.

A position is scored once: a request preempted after its first token recomputes its prompt without scoring it
again (`PromptLogprobs.scheduled`). Its KV must be computed here, not read from a prefix cache or a prefill
service (no logits come with those): the engine refuses `cached_tokens` for such a request and the decode
service computes its prompt itself (vLLM skips its prefix cache for these requests for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from zeroc.device import host_to_device
from zeroc.sampling import TokenLogprobs, read_logprobs, with_logprobs

SCORE_ROWS = 256  # prompt rows scored at a time: [256, vocab] fp32 temporaries, 128 MB at Llama-3's 128k tokens


@dataclass
class PromptLogprobs:
    """One request's prompt log-probabilities as its prefill steps compute them."""

    wanted: int  # alternatives per position (SamplingParams.prompt_logprobs)
    prompt_ids: list[int]
    scheduled: int = 0  # positions p (the first p + 1 prompt tokens) whose next token a launched step scores
    got: list[TokenLogprobs] = field(default_factory=list)  # entries read so far, for tokens 2, 3, ...
    sent: bool = False

    def positions(self, start: int, n: int) -> range:
        """The positions of a chunk of the prompt [start, start + n) whose next prompt token is not yet scored;
        they count as scheduled from here."""
        lo, hi = max(start, self.scheduled), min(start + n, len(self.prompt_ids) - 1)
        self.scheduled = max(self.scheduled, hi)
        return range(lo, max(lo, hi))

    def take(self) -> tuple[TokenLogprobs, ...] | None:
        """The whole prompt's entries, once (with the request's first token); None after that."""
        if self.sent:
            return None
        self.sent = True
        return tuple(self.got)


@dataclass
class PromptRows:
    """The prompt rows of one step: rows of its token layout projected to logits after the sampled ones."""

    owners: tuple[tuple[PromptLogprobs, int], ...]  # (whose, how many rows), in row order
    indices: tuple[int, ...]  # rows of the step's tokens [N]
    targets: tuple[int, ...]  # the prompt token each row scores
    _on_device: Tensor | None = None  # [2, rows] indices and targets, one copy (`logits_indices` makes it)

    @classmethod
    def plan(cls, chunks: list[tuple[PromptLogprobs | None, int, int]], decode_rows: int) -> PromptRows | None:
        """chunks: each admitted row's (its request's PromptLogprobs or None, chunk start, chunk tokens), in row
        order after `decode_rows` one-token rows -> the rows to score (None when there are none)."""
        owners, indices, targets, at = [], [], [], decode_rows
        for scores, start, n in chunks:
            if scores is not None:
                positions = scores.positions(start, n)
                if positions:
                    owners.append((scores, len(positions)))
                    indices += [at + p - start for p in positions]
                    targets += [scores.prompt_ids[p + 1] for p in positions]
            at += n
        return cls(tuple(owners), tuple(indices), tuple(targets)) if owners else None

    @property
    def k(self) -> int:
        return max(scores.wanted for scores, _ in self.owners)

    def logits_indices(self, last: Tensor) -> Tensor:
        """last [B]: the sampled rows' indices -> [B + rows]: theirs, then the prompt rows'."""
        self._on_device = host_to_device([self.indices, self.targets], torch.long, last.device)  # with `pack`'s
        return torch.cat([last, self._on_device[0]])

    def pack(self, sampled: Tensor, logits: Tensor, k: int) -> Tensor:
        """The step's one tensor for the host: sampled [B, 2 + 2k] (`with_logprobs`) and the prompt rows' logits
        [rows, vocab] -> [B + rows, 2 + 2k]. After `logits_indices`, which copied the targets too."""
        targets = self._on_device[1]
        parts = [with_logprobs(logits[at: at + SCORE_ROWS], targets[at: at + SCORE_ROWS], k)
                 for at in range(0, len(self.targets), SCORE_ROWS)]
        return torch.cat([sampled, *parts])

    def read(self, rows: list[list[float]], k: int) -> None:
        """Hand the host rows of the prompt rows (`pack`'s last ones) to their requests."""
        at = 0
        for scores, n in self.owners:
            scores.got += [read_logprobs(row, k, scores.wanted) for row in rows[at: at + n]]
            at += n
