"""Layers whose KV heads keep different ranks: how they are computed, cached and attended.

Calibration may give each KV head of a layer its own Q/K and V ranks (docs/compression.md). Such a
layer is a sequence of *runs*: maximal spans of consecutive KV heads that share (qk, v) ranks. Each
run is an ordinary GQA block at its own widths: the model splits its compact projections per run (fold
layers run RoPE per run on each head's kept pairs; rotate layers, d wide per head anyway, run RoPE and
their zero-padded bases once and `narrow` each run's columns), and dense attention runs per run at exact
FLOPs.

The cache keeps one row per token holding every head's dims side by side (`ModelConfig.kv_geometry`:
1 head of width Σ_g r_g), so bytes are exact and every pool, store, transfer and KV-store path that
handles [blocks, block_size, heads, width] works unchanged. Two ways to attend over that row:
- the plain paged cache: each run reads its own column range of the pool as a strided view
  [blocks, block_size, n, r] (`pool_views`) through the paged kernels, at exact FLOPs;
- anything that owns its pools (a KV policy's store, the token tier's store) or attends through a
  caller's closure: one KV head of the concatenated width, each query head's q placed in its own
  group's dims and zero elsewhere (`queries`), each head's output cut from its group's value dims
  (`outputs`). Exact too (zeros add nothing to q·k), at kv_heads times the score FLOPs.
Parts are per run: queries [*P, n * group, w], keys and values [*P, n, w].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadRun:
    """Consecutive KV heads [start, stop) that share their ranks."""

    start: int
    stop: int
    qk: int  # Q/K rank of each head
    v: int  # V rank of each head

    @property
    def heads(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HeadLayout:
    """The runs of one layer with per-KV-head ranks, and conversions between its tensor forms."""

    runs: tuple[HeadRun, ...]
    group: int  # query heads per KV head
    # `_index`'s gather/scatter maps, per geometry and device (not part of the layout's identity)
    _indices: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, qk: tuple[int, ...], v: tuple[int, ...], group: int) -> HeadLayout:
        runs: list[HeadRun] = []
        for g, ranks in enumerate(zip(qk, v)):
            if runs and (runs[-1].qk, runs[-1].v) == ranks:
                runs[-1] = HeadRun(runs[-1].start, g + 1, *ranks)
            else:
                runs.append(HeadRun(g, g + 1, *ranks))
        return cls(tuple(runs), group)

    def split(self, x: Tensor, widths: list[int], queries: bool = False) -> list[Tensor]:
        """A projection's output [*P, Σ heads * w] (head order) -> per run [*P, n (* group), w]."""
        per = self.group if queries else 1
        sizes = [r.heads * per * w for r, w in zip(self.runs, widths)]
        return [part.unflatten(-1, (r.heads * per, w)) for part, r, w in zip(x.split(sizes, -1), self.runs, widths)]

    def narrow(self, q: Tensor, k: Tensor, widths: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """q [*P, heads, w] and k [*P, kv_heads, w] at the widest width (each head's columns past its own are
        zero: rotate mode's padded bases) -> per run q [*P, n * group, w_run] and k [*P, n, w_run] (views)."""
        g = self.group
        return ([q[..., r.start * g: r.stop * g, :w] for r, w in zip(self.runs, widths)],
                [k[..., r.start: r.stop, :w] for r, w in zip(self.runs, widths)])

    def rows(self, *segments: list[Tensor]) -> Tensor:
        """Per-run keys or values [*P, n, w] -> the cache's row [*P, 1, Σ n * w]; several segments (a token
        tier's compressed dims, then its tier dims) one after another, in one copy."""
        return torch.cat([p.flatten(-2) for parts in segments for p in parts], -1).unsqueeze(-2)

    def queries(self, *segments: list[Tensor]) -> Tensor:
        """Per-run queries [*P, n * group, w] -> [*P, heads, Σ n * w]: each query head in its own KV head's
        dims of the row, zero elsewhere, so that one KV head of the row's width scores exactly. Several
        segments (a token tier's compressed dims, then its tier dims) lie one after another in the row.
        One scatter, where a copy per KV head took a kernel each."""
        widths = [[p.shape[-1] for p in parts] for parts in segments]
        total = sum(r.heads * w for ws in widths for r, w in zip(self.runs, ws))
        src = torch.cat([p.flatten(-2) for parts in segments for p in parts], -1)  # [*P, Σ n * group * w]
        out = src.new_zeros(*src.shape[:-1], self.heads * total)
        out.index_copy_(-1, self._index(widths, total, src.device), src)
        return out.unflatten(-1, (self.heads, total))

    def outputs(self, out: Tensor, widths: list[int], start: int = 0) -> list[Tensor]:
        """Attention over the row [*P, heads, T] -> per run [*P, n * group, w]: each head's output in its own
        KV head's value dims, which begin at column `start` (its weights applied to the other heads' values
        fill the rest: dropped). One gather; the parts are views of it."""
        lead, total = out.shape[:-2], out.shape[-1]
        flat = out.reshape(*lead, -1).index_select(-1, self._index([widths], total, out.device, start))
        sizes = [r.heads * self.group * w for r, w in zip(self.runs, widths)]
        return [part.unflatten(-1, (r.heads * self.group, w))
                for part, r, w in zip(flat.split(sizes, -1), self.runs, widths)]

    @property
    def heads(self) -> int:
        return self.runs[-1].stop * self.group

    def _index(self, segments: list[list[int]], total: int, device: torch.device, skip: int = 0) -> Tensor:
        """Where each element of the per-run parts lies in the flattened row [heads * total], in the parts'
        order (segment, run, head, query of the group, column); a leading segment of `skip` columns is left
        out. Built once per geometry and device: a decode step's CUDA graph replays the tensor it captured."""
        key = (tuple(map(tuple, segments)), total, str(device), skip)
        if key not in self._indices:
            at, col = [], skip
            for ws in segments:
                for r, w in zip(self.runs, ws):
                    for g in range(r.start, r.stop):
                        at += [h * total + col + c for h in range(g * self.group, (g + 1) * self.group)
                               for c in range(w)]
                        col += w
            self._indices[key] = torch.tensor(at, dtype=torch.long, device=device)
        return self._indices[key]

    def pool_views(self, pool: Tensor, widths: list[int]) -> list[Tensor]:
        """A layer's pool [blocks, block_size, 1, Σ n * w] -> per run a view [blocks, block_size, n, w] of its
        columns (no copy: the paged kernels read rows through strides)."""
        if pool.shape[2] != 1:
            raise ValueError(f"a layer with per-KV-head ranks caches one row per token, got a pool of shape "
                             f"{tuple(pool.shape)}")
        views, col = [], 0
        for r, w in zip(self.runs, widths):
            views.append(pool[:, :, 0, col: col + r.heads * w].unflatten(-1, (r.heads, w)))
            col += r.heads * w
        return views
