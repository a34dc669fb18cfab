"""Training schedules driven by progress, the larger of the step and the wall-clock fractions of the run.

The learning rate warms up over the first steps, then follows a cosine to `min_lr_ratio` of its peak.
A length curriculum trains short sequences first: a RoPE model learns retrieval at short range, where a
batch of fixed tokens holds many more retrieval examples, and then extends it to the lengths it reaches
later. Every stage keeps the tokens per step of the final stage (shorter sequences, more of them).
"""

from __future__ import annotations

import math


def progress(step: int, max_steps: int, elapsed_s: float, budget_s: float) -> float:
    """How far the run is, in [0, 1]: it ends at max_steps or at the time budget, whichever comes first."""
    return min(1.0, max(step / max_steps, elapsed_s / budget_s))


def lr_at(frac: float, step: int, peak: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay over the run's progress `frac`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def check_curriculum(curriculum: tuple[tuple[float, int], ...], seq_len: int) -> None:
    """Stages are (progress at which it starts, sequence length): starts ascending from 0, lengths at most seq_len."""
    if not curriculum:
        return
    starts = [s for s, _ in curriculum]
    if starts[0] != 0.0 or starts != sorted(starts) or starts[-1] >= 1.0:
        raise ValueError(f"curriculum stage starts must ascend from 0 and stay below 1, got {starts}")
    if any(not 16 <= n <= seq_len for _, n in curriculum):
        raise ValueError(f"curriculum lengths must be in [16, seq_len={seq_len}], got {[n for _, n in curriculum]}")


def stage_at(frac: float, curriculum: tuple[tuple[float, int], ...], seq_len: int, batch_size: int
             ) -> tuple[int, int]:
    """(sequence length, batch size) at progress `frac`: the latest stage started, at the final stage's
    tokens per step (batch_size * seq_len); no curriculum: (seq_len, batch_size) throughout."""
    length = seq_len
    for start, n in curriculum:
        if frac >= start:
            length = n
    return length, max(1, batch_size * seq_len // length)
