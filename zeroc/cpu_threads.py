"""The engine thread's CPU threads: how many intra-op threads it runs, which cores it keeps to, and why no other
thread of a service runs parallel work.

PyTorch's default takes every core for each op, while the gRPC handler threads (and, colocated, the
tokenizer and scheduling work) need the same cores between steps: on a loaded machine both then stall
each other. On more than two cores the engine keeps off the first core (its OpenMP workers, created by
the engine thread, inherit its affinity), which the service's other threads keep to themselves. On two
cores or fewer nothing is kept back: one core alone halves the engine's speed (docs/engine.md).

Only the engine thread runs parallel regions. Every thread that does gets its own OpenMP team, whose workers
stay alive while the thread does; once a process holds more OpenMP threads than there are cores, libgomp
stops letting idle workers spin and parks them instead, and every parallel op then pays to wake its workers.
A service whose main thread loaded the model with two threads made a 1024x384 GEMV in the engine thread take
80 us instead of 13 (2 cores), and a batch-1 decode step 7 ms instead of 2.5. So a service calls
`serial_by_default` before it touches torch; `enter_engine_thread` then gives the engine thread its pool and
leaves every other thread single-threaded.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from zeroc.config import ThreadsConfig

log = logging.getLogger(__name__)


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def engine_cores(cfg: ThreadsConfig, cores: list[int]) -> list[int]:
    """The cores the engine thread keeps to: all but the first when there are more than two (and pinning is
    on), else all of them."""
    return cores[1:] if cfg.pin and len(cores) > 2 else cores


def engine_thread_count(cfg: ThreadsConfig, cores: list[int], env: dict[str, str] | None = None) -> int:
    """Intra-op threads of the engine: the setting, else OMP_NUM_THREADS when set, else one per engine core."""
    if cfg.engine:
        return cfg.engine
    raw = (os.environ if env is None else env).get("OMP_NUM_THREADS", "")
    if raw.strip().isdigit() and int(raw) > 0:
        return int(raw)
    return len(engine_cores(cfg, cores))


def serial_by_default() -> None:
    """Call in a service's main thread before its first torch op: this thread, and every thread whose first
    parallel op comes later, runs ops on one thread (PyTorch sets a thread's pool from this default the first
    time the thread runs parallel work)."""
    torch.set_num_threads(1)


def _set_engine_pool(threads: int) -> None:
    """Set the calling (engine) thread's intra-op threads, leaving the default of every other thread at one."""
    torch.set_num_threads(threads)
    torch.get_num_threads()  # PyTorch's per-thread pool set-up runs now, while the default is still `threads`
    # torch.set_num_threads also sets the default for threads that have not run parallel work yet; set it back
    # to one from a thread that exits at once (the engine thread's own pool stays as it is).
    restore = threading.Thread(target=torch.set_num_threads, args=(1,), name="serial-default")
    restore.start()
    restore.join()


def enter_engine_thread(cfg: ThreadsConfig) -> tuple[int, list[int]]:
    """Call from the engine thread before its first step: set its intra-op threads and pin it.
    Returns (threads, cores it keeps to)."""
    cores = available_cores()
    keep = engine_cores(cfg, cores)
    threads = engine_thread_count(cfg, cores)
    _set_engine_pool(threads)
    if keep != cores:
        os.sched_setaffinity(threading.get_native_id(), keep)  # this thread only: handlers keep every core
    log.info("engine threads", extra={"intra_op_threads": threads, "cores": keep})
    return threads, keep


_SAMPLES = 8  # recent step times kept per (step size, thread count)
_PROBE_STEPS = 3  # steps a probe runs on the other count
_SWITCH_GAIN = 0.9  # the other count must measure 10% faster to switch: single slow steps are noise


class ThreadGovernor:
    """Chooses between the engine thread's whole pool and one thread, and re-checks the choice every second.

    Two threads of which one is preempted make every op wait for it. Beside one busy process on two cores, a
    batch-1 decode step took 7-15 ms on two threads against 3.6 on one, while on a quiet machine two threads
    take 2.6. So the governor runs the steps on one count, and every `probe_s` runs a few on the other. It
    keeps each count's recent step times per step size (tokens, in powers of two) and, after a probe, keeps the
    count whose median recent step of the size both have run is 10% faster. The first step after a switch is
    not counted: it wakes the workers. Use it from the engine thread only: `choose` before a step, `record`
    after it.
    """

    def __init__(self, full: int, probe_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = _set_engine_pool):
        self.full, self.probe_s, self.clock, self.set_threads = full, probe_s, clock, set_threads
        self.mode = self.current = full  # the count steps run on / the count of the step running now
        self._probe_left = 0
        self._last_probe = clock()
        self._switched = False  # the step running now is the first on its count
        self._times: dict[tuple[int, int], deque[tuple[float, float]]] = {}  # (size, threads) -> (at, seconds)

    def choose(self) -> int:
        """The thread count for the next step; sets it on the calling thread when it changes."""
        if self.full > 1 and not self._probe_left and self.clock() - self._last_probe > self.probe_s:
            self._probe_left, self._last_probe = _PROBE_STEPS, self.clock()
        want = (1 if self.mode == self.full else self.full) if self._probe_left else self.mode
        self._switched = want != self.current
        if self._switched:
            self.set_threads(want)
            self.current = want
        return want

    def record(self, tokens: int, seconds: float) -> None:
        """The step just run computed `tokens` tokens in `seconds`."""
        if self._switched:
            return
        key = (tokens.bit_length(), self.current)
        self._times.setdefault(key, deque(maxlen=_SAMPLES)).append((self.clock(), seconds))
        if self._probe_left:
            self._probe_left -= 1
            if not self._probe_left:
                self.mode = self._verdict()

    def _verdict(self) -> int:
        """After a probe: the count to keep, judged on the step size both counts ran most in the last while."""
        other = self.current
        since = self._last_probe - 2 * self.probe_s  # figures older than this say nothing about the load now
        recent = {key: [t for at, t in times if at >= since] for key, times in self._times.items()}
        # the size both counts ran most often lately; none: nothing to compare, keep the mode
        count, size = max(((min(len(recent[z, other]), len(recent.get((z, self.mode), []))), z)
                           for z, n in recent if n == other), default=(0, 0))
        if not count:
            return self.mode
        faster = statistics.median(recent[size, other]) < _SWITCH_GAIN * statistics.median(recent[size, self.mode])
        return other if faster else self.mode
