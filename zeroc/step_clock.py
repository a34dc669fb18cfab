"""Where an engine step's wall time goes, phase by phase (benchmarks read it; serving never pays for it).

The engine calls `start()` when a step begins and `lap(phase)` where each phase ends; a lap adds the
wall time since the previous lap to its phase. On a GPU the phases that launch work (forward, sample)
count the host's launch time and `wait` the device's remaining time, so everything but `wait` is the
host time a synchronous step spends on its critical path. On the CPU, which runs ops as they are
called, forward and sample are the compute itself. An Engine holds a `NullClock` unless a benchmark
hands it a `StepClock`.
"""

from __future__ import annotations

import time

# In the order a step runs them. With async scheduling a step's wait and outputs belong to the step before.
PHASES = (
    "schedule",  # preemption, admission, dropping rows of sequences that left
    "inputs",  # cache slots, the persistent batch's updates, a prefill's host tensors
    "forward",  # the model's forward (a CUDA graph's replay, or eager launches)
    "sample",  # the sampling batch, sampling, the ids' copy to the host started
    "bookkeeping",  # sequence counters, the prompt-computed hook
    "wait",  # until the step's sampled ids are on the host
    "outputs",  # stop checks, detokenization, freeing finished sequences' blocks
)


class NullClock:
    """Times nothing: what an Engine holds unless a benchmark hands it a StepClock."""

    def start(self) -> None:
        pass

    def lap(self, phase: str) -> None:
        pass


class StepClock(NullClock):
    """Wall seconds per phase, summed over the `steps` started since it was made."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._last = time.perf_counter()

    def start(self) -> None:
        self.steps += 1
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last  # KeyError: not a phase
        self._last = now

    def ms_per_step(self) -> dict[str, float]:
        """Each phase's mean milliseconds per step."""
        return {p: s * 1e3 / max(self.steps, 1) for p, s in self.seconds.items()}
