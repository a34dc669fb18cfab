"""What one engine step costs, as `zeroc bench engine` and the GPU scripts measure it: the device syncs it makes
(and where each comes from), its device time, and its kernels by device time (`profile_step`)."""

from __future__ import annotations

import contextlib
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


class _HostReads(TorchFunctionMode):
    """Counts calls that read tensor values to the host (the CPU's stand-in for device syncs)."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def warned_syncs():
    """Yields a list that gets, for each sync warning issued inside (torch's sync debug mode warns at every
    device sync), the project frames that called it ("file:line <- file:line ..."), innermost first."""
    where: list[str] = []

    def seen(message, *_args, **_kwargs) -> None:  # runs at the warning, so the stack is the sync's caller's
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and "/warnings.py" not in f.filename][-3:]
            where.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = seen
        yield where


@contextlib.contextmanager
def count_syncs(device: torch.device):
    """Yields a list that holds the count once the block has run, then (on CUDA) where each sync was called
    from, so an unexpected one can be found from a device run's output alone."""
    out = [0]
    if device.type == "cuda":
        with warned_syncs() as where:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield out
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out[:] = [len(where), *where]
    else:
        with _HostReads() as mode:
            yield out
        out[0] = mode.count


class DeviceTimer:
    """The Engine's device_timer: the span of each step's device work, in seconds, on `times`."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._pending = device, [], []

    @contextlib.contextmanager
    def __call__(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.times.append(time.perf_counter() - t0)

    def collect(self) -> list[float]:
        """Every step's device seconds so far (waits for the events, after the timed steps)."""
        for start, end in self._pending:
            end.synchronize()
            self.times.append(start.elapsed_time(end) / 1e3)
        self._pending.clear()
        return self.times


def profile_step(step, device: torch.device, top: int = 15) -> list[dict]:
    """Run `step()` once under torch's profiler -> its `top` ops by self device time (host time off a GPU), each
    {"name", "ms", "calls"}: where a step's time goes, kernel by kernel, kernels replayed from a CUDA graph
    included (CUPTI records them)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
        if on_gpu:
            torch.cuda.synchronize()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [{"name": e.key, "ms": getattr(e, key) / 1e3, "calls": e.count} for e in events[:top]
            if getattr(e, key) > 0]
