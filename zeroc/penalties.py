"""Logit bias and the repetition, frequency and presence penalties, from token counts kept on the device.

A request that sets a penalty or a logit bias (`SamplingParams.penalized`) holds a slot in `PenaltyState`
from its first step to its end: [V] rows on the device of its generated tokens' counts, of the tokens it has
seen (prompt or output) and of its logit bias. The engine records each step's sampled ids into the slots on the
device, so a step's penalties see the token of the step before it even while that step's ids are still on their
way to the host (running ahead); nothing is rebuilt from the host's token lists but at admission (a preempted sequence's
outputs, once). They are applied as vLLM applies them, in this order, to a copy of the logits (the raw ones
stay for log-probabilities):
- logit bias (OpenAI's `logit_bias`): a fixed amount added to the logits of the tokens it names, kept in the
  slot as a [V] row;
- repetition r (Hugging Face's and vLLM's extension; 1 is none): a token seen in the prompt or the output has
  its logit divided by r where positive, multiplied by r where not;
- frequency f and presence p (OpenAI's, in [-2, 2]; 0 is none): a token's logit loses f times its count in
  the output, and p once it occurs there at all.
`ban_tokens` puts a request's stop tokens out of reach until it has its `min_tokens` (vLLM's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from zeroc.device import host_to_device
from zeroc.sampling import SamplingParams


def ban_tokens(scores: Tensor, bans: list[tuple[int, Iterable[int]]]) -> Tensor:
    """scores [B, V], changed in place and returned: each (row, token ids) to the dtype's lowest finite score, whose
    weight is 0 (not -inf, which the samplers read as a broken row). Ids past V are none of the model's: skipped.
    One small host-to-device copy, no sync."""
    vocab = scores.shape[1]
    pairs = [(row, t) for row, ids in bans for t in ids if 0 <= t < vocab]
    if pairs:
        at = host_to_device([[row for row, _ in pairs], [t for _, t in pairs]], torch.int64, scores.device)  # [2, n]
        scores[at[0], at[1]] = torch.finfo(scores.dtype).min
    return scores


@dataclass(frozen=True)
class PenaltyBatch:
    """One step's penalties: each row's slot (rows without penalties read the zero row) and parameters."""

    slots: Tensor  # [B] int64 slot of each row
    frequency: Tensor | None  # [B, 1] float32, negated; None where no row sets one
    presence: Tensor | None  # [B, 1] float32, negated; None where no row sets one
    repetition: Tensor | None  # [B, 1] float32; None where no row sets one
    biased: bool  # some row sets a logit bias
    sampled_rows: Tensor  # [R] int64 rows whose sampled token counts (penalized rows that sample this step)
    sampled_slots: Tensor  # [R] int64 their slots


class PenaltyState:
    """The slots of the penalized requests, grown by doubling as more run at once. Slot 0 stays zero: the
    rows of a step that set no penalty read it. Counts are float32 (exact far past any context length), so a
    step's arithmetic stays in one dtype: on the CPU a mixed-dtype or broadcasting `where` over [B, V] ran
    5-15x slower than the same work in float32 (ad hoc, batch 64 x 128k tokens: 225 ms against 32 ms). The step's
    [B, V] temporaries are kept buffers too, reused step after step: fresh ones cost the CPU a page fault per
    4 KiB page each step."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(0, vocab, device=device)  # [slots, V] each token's count in the output
        self.seen = torch.zeros(0, vocab, device=device)  # [slots, V] 1 for a token in the prompt or the output
        self.bias = torch.zeros(0, vocab, device=device)  # [slots, V] each token's logit bias
        self.slot: dict[str, int] = {}  # request id -> its slot
        self._free: list[int] = []
        self._scratch = torch.zeros(3, 0, vocab, device=device)  # [3, B, V] the step's buffers, grown as needed
        self._last: tuple[tuple, PenaltyBatch] | None = None  # the last step's batch and what it was built from

    def _grow(self) -> None:
        old = self.counts.shape[0]
        new = max(4, 2 * old)
        self.counts = torch.cat([self.counts, self.counts.new_zeros(new - old, self.vocab)])
        self.seen = torch.cat([self.seen, self.seen.new_zeros(new - old, self.vocab)])
        self.bias = torch.cat([self.bias, self.bias.new_zeros(new - old, self.vocab)])
        self._free += range(max(old, 1), new)

    def admit(self, request_id: str, prompt_ids: list[int], output_ids: list[int],
              logit_bias: tuple[tuple[int, float], ...] = ()) -> None:
        """Give a penalized request its slot, with what it has generated so far (a preempted one's outputs) and
        its logit bias (token ids below the vocabulary size, checked by the caller)."""
        if request_id in self.slot:
            return
        if not self._free:
            self._grow()
        s = self._free.pop()
        self.slot[request_id] = s
        # not torch.bincount: on CUDA it reads the ids' max back to size its output, a device sync
        out = host_to_device(output_ids, torch.long, self.device)
        self.counts[s] = 0.0
        self.counts[s].index_put_((out,), torch.ones_like(out, dtype=self.counts.dtype), accumulate=True)
        self.seen[s] = 0.0
        self.seen[s, host_to_device(prompt_ids + output_ids, torch.long, self.device)] = 1.0
        self.bias[s] = 0.0
        if logit_bias:
            self.bias[s, host_to_device([t for t, _ in logit_bias], torch.long, self.device)] = host_to_device(
                [b for _, b in logit_bias], torch.float32, self.device)

    def release(self, request_id: str) -> None:
        s = self.slot.pop(request_id, None)
        if s is not None:
            self._free.append(s)

    def batch(self, rows: list[tuple[str, SamplingParams, bool]]) -> PenaltyBatch | None:
        """The step's penalties for rows (request id, params, whether its token counts); None if none sets one.
        Every penalized row's request must have been admitted."""
        if not any(p.penalized for _, p, _ in rows):
            return None
        slots = [self.slot[rid] if p.penalized else 0 for rid, p, _ in rows]
        counted = [i for i, (_, p, samples) in enumerate(rows) if p.penalized and samples]
        values = [[-p.frequency_penalty for _, p, _ in rows], [-p.presence_penalty for _, p, _ in rows],
                  [p.repetition_penalty for _, p, _ in rows]]
        key = (slots, counted, values, any(p.logit_bias for _, p, _ in rows))
        if self._last is not None and self._last[0] == key:
            return self._last[1]  # decode steps of an unchanged batch: its tensors serve again, nothing is copied
        # the ids in one copy, the parameters in another: [B + 2R] int64, [3, B] float32
        ids = host_to_device(slots + counted + [slots[i] for i in counted], torch.long, self.device)
        floats = host_to_device(values, torch.float32, self.device).unsqueeze(2)  # [3, B, 1]
        used = [any(v != neutral for v in col) for col, neutral in zip(values, (0.0, 0.0, 1.0))]
        b, r = len(rows), len(counted)
        batch = PenaltyBatch(ids[:b], *(floats[i] if used[i] else None for i in range(3)), key[3],
                             ids[b: b + r], ids[b + r:])
        self._last = (key, batch)
        return batch

    def apply(self, logits: Tensor, b: PenaltyBatch) -> Tensor:
        """The penalized logits [B, V] float32 of logits [B, V], in a buffer the next call reuses."""
        rows = logits.shape[0]
        if self._scratch.shape[1] < rows:
            self._scratch = torch.zeros(3, rows, self.vocab, device=self.device)
        x, counts, factor = self._scratch[:, :rows]  # [B, V] each
        x.copy_(logits)
        if b.biased:
            torch.index_select(self.bias, 0, b.slots, out=counts)
            x.add_(counts)
        if b.repetition is not None:
            # a seen token's logit times 1/r where positive, r where not: x + x * (factor - 1) on seen tokens
            r = b.repetition
            torch.index_select(self.seen, 0, b.slots, out=counts)
            torch.gt(x, 0, out=factor)
            factor.mul_(1 / r - r).add_(r - 1).mul_(counts)
            x.addcmul_(x, factor)
        if b.frequency is not None or b.presence is not None:
            torch.index_select(self.counts, 0, b.slots, out=counts)
            if b.frequency is not None:
                x.addcmul_(counts, b.frequency)
            if b.presence is not None:
                x.addcmul_(counts.clamp_(max=1.0), b.presence)
        return x

    def record(self, b: PenaltyBatch, sampled: Tensor) -> None:
        """Count each penalized row's sampled id (sampled: [B] on the device; a FAILED row's counts as 0)."""
        ids = sampled.index_select(0, b.sampled_rows).clamp(min=0)
        ones = torch.ones_like(ids, dtype=self.counts.dtype)
        self.counts.index_put_((b.sampled_slots, ids), ones, accumulate=True)
        self.seen.index_put_((b.sampled_slots, ids), ones)
