"""What a request is inside the engine (`Sequence`) and what the engine hands back for it (`StepOutput` each step,
`GenerationResult` from `Engine.generate`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from zeroc.prompt_logprobs import PromptLogprobs
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

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:  # len(all_ids), without building it (the scheduler asks every step)
        return len(self.prompt_ids) + len(self.output_ids)
