"""What a request is inside the engine (`Sequence`), what the engine hands back for it (`StepOutput` each step,
`GenerationResult` from `Engine.generate`), and a step it launched whose ids it has yet to read (`LaunchedStep`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from zeroc.device import DeviceToHost
from zeroc.prompt_logprobs import PromptLogprobs, PromptRows
from zeroc.sampling import SamplingParams, TokenLogprobs
from zeroc.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class StepOutput:
    """What one request produced in one engine step."""

    request_id: str
    token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    queued_s: float = 0.0  # how long the request waited in `waiting` before it was first scheduled
    preemptions: int = 0  # times it was preempted so far
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked (params.logprobs)
    # with the first token, when the request asked (params.prompt_logprobs): one per prompt token from the second
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, when the request asked
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None  # one per prompt token from the second, if asked


class Results:
    """Each request's StepOutputs gathered into its GenerationResult (`Engine.generate`)."""

    def __init__(self, prompts: dict[str, list[int]]):
        self.prompts = prompts  # request id -> prompt ids
        self.tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
        self.logprobs: dict[str, list[TokenLogprobs]] = {rid: [] for rid in prompts}
        self.prompt_logprobs: dict[str, tuple[TokenLogprobs, ...] | None] = {rid: None for rid in prompts}
        self.texts: dict[str, str] = {rid: "" for rid in prompts}
        self.ends: dict[str, StepOutput] = {}

    def add(self, out: StepOutput) -> None:
        rid = out.request_id
        self.tokens[rid].extend(out.token_ids)
        self.logprobs[rid].extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[rid] = out.prompt_logprobs
        self.texts[rid] += out.text_delta
        if out.finished:
            self.ends[rid] = out

    def ordered(self, request_ids: list[str]) -> list[GenerationResult]:
        return [GenerationResult(rid, self.prompts[rid], self.tokens[rid], self.texts[rid],
                                 self.ends[rid].finish_reason or "stop", self.ends[rid].error,
                                 tuple(self.logprobs[rid]), self.prompt_logprobs[rid]) for rid in request_ids]


@dataclass
class Sequence:
    """A request inside the engine: its prompt, what it produced, and where its computation stands."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    released: int = 0  # characters of detok.text already streamed
    in_cache: int = 0  # tokens whose K/V are in the cache
    added_at: float = field(default_factory=time.monotonic)
    queued_s: float | None = None  # set when first scheduled
    preemptions: int = 0
    stop_ids: frozenset[int] = frozenset()  # token ids that end it (its stop ids, and EOS unless ignored)
    hold: int = 0  # characters held back while they may begin a stop string: the longest one's length - 1
    pending: int = 0  # launched steps sampling a token for this sequence whose ids are not on the host yet
    finished: bool = False  # finished or aborted: a step still in flight may hold a row for it
    prompt_scores: PromptLogprobs | None = None  # when params.prompt_logprobs asks
    matcher: Any = None  # when params.guide is set: its xgrammar matcher, at the text so far (zeroc/structured.py)
    guide_after: int | None = None  # the token the guide waits for (its `after`); None once it applies
    priority: int = 0  # lower runs first under the "priority" scheduling policy
    speculative: bool = False  # drafts tokens and checks them (zeroc/speculative.py): its input comes from the host

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:  # len(all_ids), without building it (the scheduler asks every step)
        return len(self.prompt_ids) + len(self.output_ids)

    def advance(self, token: int, max_positions: int, logprobs: tuple[TokenLogprobs, ...] = ()) -> StepOutput:
        """Take one sampled token: the guide's check, the stop token and strings, the length limits and the text
        released (held back while it may begin a stop string). The output says whether that finished it (the
        engine then frees it); "error" where the guide refuses the token (its mask allowed none)."""
        guiding = self.matcher is not None and self.guide_after is None
        if guiding and not self.matcher.accept_token(token):
            return StepOutput(self.request_id, [], self.detok.text[self.released:], True, "error", self.queued_s or 0.0,
                              self.preemptions, error=f"token {token} breaks the request's guide")
        if self.matcher is not None and token == self.guide_after:
            self.guide_after = None  # the guide applies from the next token on
        self.output_ids.append(token)
        p = self.params
        # a guide whose text is complete ends it, the stop token it ended on included (even with ignore_eos)
        reason = "stop" if guiding and self.matcher.is_terminated() else None
        searched = len(self.detok.text)  # text that earlier tokens searched for stop strings: none ends in it
        if token in self.stop_ids or reason:
            reason = "stop"  # the stop token itself adds no text
        else:
            self.detok.add([token])
        text = self.detok.text
        # searched from where a match could still begin (text earlier tokens searched holds none); not before
        # min_tokens, as vLLM
        if p.stop and len(self.output_ids) >= p.min_tokens:
            hits = [(i, i + len(s)) for s in p.stop if (i := text.find(s, max(0, searched - len(s) + 1))) != -1]
            if hits:
                start, end = min(hits)
                text, reason = text[: end if p.include_stop_str_in_output else start], "stop"
        if reason is None and (len(self.output_ids) >= p.max_new_tokens or self.num_tokens >= max_positions):
            reason = "length"
        # Hold back text that might be the start of a stop string until it is decided.
        end = max(self.released, len(text) - (0 if reason else self.hold))
        delta, self.released = text[self.released:end], end
        return StepOutput(self.request_id, [token], delta, reason is not None, reason, self.queued_s or 0.0,
                          self.preemptions, logprobs=logprobs)


@dataclass
class LaunchedStep:
    """A step on the device: its rows, which of them sample a token that counts, and the sampled ids."""

    rows: list[Sequence]
    samples: set[int]  # id() of the rows whose token counts (a chunk of a prompt samples nothing)
    ids: DeviceToHost  # [B] the sampled ids on their way to the host, or [B, 2 + 2k] rows of `with_logprobs`
    logprobs: int | None = None  # k of those rows; None: plain ids
    prompt_rows: PromptRows | None = None  # rows of `ids` after the sampled ones: prompt log-probabilities
    free_after: list[str] = field(default_factory=list)  # request ids whose blocks go once this step has run
    # speculating rows' drafts (by id() of the row) and the token sampled after the last one and each draft token
    # but the last, [sum of the drafts' lengths] (rows of `with_logprobs` where `logprobs`) on their way to the host
    # (zeroc/speculative.py); None with drafts: they follow the sampled rows in `ids` (no prompt rows: one copy)
    drafts: dict[int, list[int]] = field(default_factory=dict)
    targets: DeviceToHost | None = None
    marks: dict[int, Tensor] = field(default_factory=dict)  # seeded drafting rows' generators before the step
    # the next step waits for this one's ids: a guided row's mask (or whether it has one yet, zeroc/structured.py),
    # a speculating row's draft and input need them
    synced: bool = False

    def holds(self, request_id: str) -> bool:
        return any(s.request_id == request_id for s in self.rows)
