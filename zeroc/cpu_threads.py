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
import threading

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


def enter_engine_thread(cfg: ThreadsConfig) -> tuple[int, list[int]]:
    """Call from the engine thread before its first step: set its intra-op threads and pin it.
    Returns (threads, cores it keeps to)."""
    cores = available_cores()
    keep = engine_cores(cfg, cores)
    threads = engine_thread_count(cfg, cores)
    torch.set_num_threads(threads)
    torch.get_num_threads()  # PyTorch's per-thread pool set-up runs now, while the default is still `threads`
    # torch.set_num_threads also sets the default for threads that have not run parallel work yet; set it back
    # to one from a thread that exits at once (the engine thread's own pool stays as it is).
    restore = threading.Thread(target=torch.set_num_threads, args=(1,), name="serial-default")
    restore.start()
    restore.join()
    if keep != cores:
        os.sched_setaffinity(threading.get_native_id(), keep)  # this thread only: handlers keep every core
    log.info("engine threads", extra={"intra_op_threads": threads, "cores": keep})
    return threads, keep
