"""Host->device copies that do not wait for the device.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory, which makes the host wait
until the stream has drained: a device sync in the middle of a step. Pinned memory and an
asynchronous copy let the host run ahead (the caching host allocator keeps the pinned buffer alive
until the copy has run).
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
