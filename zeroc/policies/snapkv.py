"""SnapKV (Li et al., 2024): the last `window` queries vote for the past tokens to keep.

SnapKV compresses a prompt once, after prefill. In streaming there is no prompt boundary, so the
vote is taken whenever the cache must shrink (each step the budget forces an eviction): the
observation window's queries attend over the kept keys (causally), their attention is summed
over the window and the KV head's query group, max-pooled along the sequence (neighbours of a
strong token survive with it, as in the paper's clustering), and the top tokens are kept beside
the window itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc.policies.base import check_budget
from zeroc.policies.eviction import EvictionPolicy, EvictionState, protect_recent


@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    budget: float = 1.0
    window: int = 32  # observation window: recent queries that vote, and recent tokens always kept
    kernel: int = 7  # max-pooling width (odd)

    name = "snapkv"

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"SnapKV window must be a positive int, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be a positive odd int, got {self.kernel!r}")

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.window

    @property
    def floor_tokens(self) -> int:
        return 1

    def votes(self, state: EvictionState) -> Tensor:
        """Pooled attention of the window's queries to each live token -> [B, kv_heads, n] float64."""
        k, pos = state.live(state.k), state.live(state.pos)  # [B, kv, n, dq], [B, kv, n]
        b, kv, n, dq = k.shape
        w = state.queries.shape[2]
        q = state.queries.view(b, kv, -1, w, dq).float()  # [B, kv, group, w, dq]
        scores = torch.einsum("bkgwd,bknd->bkgwn", q, k.float()) * state.scale
        causal = pos[:, :, None, None, :] <= state.query_pos[None, None, None, :, None]  # [B, kv, 1, w, n]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        probs = probs.nan_to_num(0.0)  # a window query older than every kept token has no vote
        vote = probs.sum(dim=(2, 3))  # [B, kv, n]
        # Pool along the sequence: slots are not in position order, so sort, pool, and put back.
        order = pos.argsort(dim=-1)
        ranked = torch.gather(vote, 2, order).reshape(b * kv, 1, n)
        pooled = F.max_pool1d(ranked, self.kernel, stride=1, padding=self.kernel // 2).view(b, kv, n)
        return torch.zeros_like(pooled).scatter_(2, order, pooled).double()

    def priority(self, state: EvictionState, keep: int) -> Tensor:
        recent = protect_recent(state.live(state.pos), state.seen, min(self.window, keep))
        return recent + self.votes(state)
