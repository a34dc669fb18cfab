"""Dtype names (zeroc.config) as torch dtypes."""

from __future__ import annotations

import torch

from zeroc.config import dtype_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name ("float32", "bf16", "torch.float16", ...) to a torch dtype."""
    return DTYPES[dtype_name(name)]
