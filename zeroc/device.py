"""Copies between host and device that do not make the host wait where it need not.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory, which makes the host wait
until the stream has drained: a device sync in the middle of a step. Pinned memory and an
asynchronous copy let the host run ahead (the caching host allocator keeps the pinned buffer alive
until the copy has run). The other way, `DeviceToHost` starts a step's result on its way to the host and
waits for that copy alone when the host reads it, not for work queued after it (the next step).
"""

from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A small host list as a tensor on `device` without a device sync: on CUDA through pinned memory
    and a non-blocking copy; elsewhere a plain tensor."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class DeviceToHost:
    """A small device tensor on its way to the host: `DeviceToHost(t)` queues the copy behind the work that
    produces t; `tolist()` waits for that copy only. On the CPU it is t itself."""

    def __init__(self, t: Tensor):
        if not t.is_cuda:
            self._host, self._ready = t, None
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def tolist(self) -> list:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
