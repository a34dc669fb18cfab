"""Evaluation and calibration text as token windows."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from zeroc.config import ZeroCError
from zeroc.tokenizer import Tokenizer


def read_eval_tokens(tokenizer: Tokenizer, path: str | Path, max_tokens: int | None = None) -> Tensor:
    """Tokenize an evaluation text file -> [n_tokens]."""
    path = Path(path)
    if not path.is_file():
        raise ZeroCError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ZeroCError(f"{path}: data file is empty")
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ZeroCError(f"{path}: fewer than 2 tokens to score")
    return torch.tensor(ids, dtype=torch.long)


def windows_of(tokens: Tensor, ctx: int) -> list[Tensor]:
    """Non-overlapping windows of ctx tokens; a last shorter window is kept if it scores anything."""
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2, got {ctx}")
    return [w for w in torch.split(tokens, ctx) if w.numel() >= 2]
