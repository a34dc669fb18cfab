"""The engine's scheduling decisions, apart from its mechanics (zeroc/engine.py): which waiting sequences a step
admits, with how many of their tokens, and which running sequence gives way when the cache runs out.

Both follow SchedulerConfig.policy: under "priority" a lower `Sequence.priority` value goes first and gives way
last; under "fcfs" every priority is 0, so arrival order alone decides.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroc.kv_cache import PagedKVCache
    from zeroc.sequence import Sequence


def admit(waiting: deque[Sequence], rows: int, cache: PagedKVCache, free: int, budget: int, max_num_seqs: int
          ) -> list[tuple[Sequence, int]]:
    """Admit waiting sequences by priority, then as queued, while their whole context fits the cache's `free`
    blocks (what the step's `rows` decode rows leave), each with the tokens it computes this step; admitted ones
    leave `waiting`, but for a chunk. A prompt longer than the token `budget` left computes a chunk of it (chunked
    prefill) and stays first in line, holding its blocks, until its last chunk; only then does it sample and run.
    With no budget left at all (the running decodes take it all), the first sequence still computes a block's worth
    of tokens: prompts make progress while a step's cost, and so the running sequences' time per output token, stays
    bounded by the budget plus one block."""
    admitted: list[tuple[Sequence, int]] = []
    stalled = False  # a sequence that holds blocks waits for more: none that holds none passes it
    # Sequences that already hold blocks (a received or reused prefix, an unfinished chunked prompt) go
    # first: one queued behind a sequence waiting for exactly those blocks would wait forever. One of them that
    # does not fit yet lets the next of them try (whose blocks it may be waiting for).
    for seq in sorted(waiting, key=lambda s: (s.in_cache == 0, s.priority)):
        if rows + len(admitted) >= max_num_seqs or (stalled and seq.in_cache == 0):
            break
        n = seq.num_tokens - seq.in_cache  # tokens to compute; a received prefix is in_cache
        blocks = cache.blocks_needed(seq.request_id, n)
        take = min(n, cache.block_size) if budget <= 0 and not admitted else min(n, budget)
        if take > 0 and blocks > free and seq.in_cache > 0:
            stalled = True
            continue
        if blocks > free or take <= 0:
            break
        if seq.queued_s is None:
            seq.queued_s = time.monotonic() - seq.added_at
        admitted.append((seq, take))
        if take < n:  # a chunk: it keeps its place in line
            break
        waiting.remove(seq)
        free -= blocks
        budget -= n
    return admitted


def preemption_victim(candidates: list[Sequence]) -> Sequence:
    """The sequence that gives way when the cache cannot grow (a running one, or a waiting one that holds blocks:
    a partly computed prompt, a received prefix): the highest priority value, the latest to arrive among equals
    (as vLLM preempts, whose running requests include partly computed prompts)."""
    return max(candidates, key=lambda s: (s.priority, s.added_at))


def holders(waiting: deque[Sequence]) -> list[Sequence]:
    """The waiting sequences that hold blocks."""
    return [s for s in waiting if s.in_cache > 0]
