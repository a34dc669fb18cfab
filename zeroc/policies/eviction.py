"""Token eviction, shared by StreamingLLM, H2O and SnapKV.

At step t (t tokens seen, the new one included) a layer may hold
`eviction_keep(t, budget, floor)` tokens. If the new token does not fit, the policy ranks the
tokens already kept and the lowest-ranked one is dropped *before* attending (the budget grows by
at most one token a step, so one victim always makes room, and the new token is always kept), so
attention at step t never sees more than the budget allows. Kept sets are per sequence and per KV
head (H2O and SnapKV rank per head); every (sequence, head) keeps the same count, so the state
stays rectangular; the new token reuses the victim's slot.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zeroc.policies.base import (REFERENCE_BITS, KVPolicy, LayerGeometry, LayerKVCache, attend_dense,
                                 eviction_keep, layer_geometry, grow)

if TYPE_CHECKING:  # annotations only: the model sits above the policies
    from zeroc.model import Transformer

PROTECTED = 1e12  # priority offset of tokens a policy must keep (sinks, recent window)


@dataclass
class EvictionState:
    """What one layer keeps for B sequences: n live slots per sequence and KV head.

    Slots are not in position order: an evicted token's slot is reused by the next new token.
    """

    k: Tensor  # [B, kv_heads, capacity, k_dim]; slots [0, n) are live
    v: Tensor  # [B, kv_heads, capacity, v_dim]
    pos: Tensor  # [B, kv_heads, capacity] absolute position held in each slot
    score: Tensor  # [B, kv_heads, capacity] float64 attention each token has received (summed over the group)
    queries: Tensor  # [B, heads, w, k_dim] the last w queries (SnapKV's observation window)
    query_pos: Tensor  # [w] their positions
    n: int = 0  # live slots
    seen: int = 0  # tokens seen per sequence
    scale: float = 1.0  # the model's attention scale (SnapKV's vote uses it)

    def live(self, t: Tensor) -> Tensor:
        """The live slots of one of the [B, kv, capacity, ...] tensors."""
        return t[:, :, : self.n]


class EvictionPolicy(KVPolicy):
    """A policy that keeps a subset of past tokens at full precision."""

    query_window: int = 0  # how many recent queries the state must remember

    @property
    @abc.abstractmethod
    def floor_tokens(self) -> int:
        """Minimum tokens kept (bounded by the tokens seen)."""

    def keep(self, seen: int) -> int:
        """Tokens a layer may hold once `seen` tokens have arrived (non-decreasing, by at most 1 a token).

        Called by `EvictionCache.step` and by the serving cache (`zeroc.serving_policies.eviction`)."""
        return eviction_keep(seen, self.budget, self.floor_tokens)

    @abc.abstractmethod
    def priority(self, state: EvictionState, keep: int) -> Tensor:
        """Rank the live tokens (the incoming one excluded); the lowest is evicted. -> [B, kv_heads, n] float64"""

    def new_cache(self, model: Transformer, layer: int, batch: int) -> LayerKVCache:
        return EvictionCache(self, layer_geometry(model, layer), batch, model.lm_head.weight.dtype)


def protect_recent(pos: Tensor, seen: int, recent: int) -> Tensor:
    # pos: [B, kv, n] -> [B, kv, n] float64: PROTECTED + position for the `recent` latest positions, else 0
    is_recent = pos >= seen - recent
    return torch.where(is_recent, PROTECTED + pos.double(), torch.zeros_like(pos, dtype=torch.float64))


class EvictionCache(LayerKVCache):
    def __init__(self, policy: EvictionPolicy, geom: LayerGeometry, batch: int, dtype: torch.dtype):
        self.policy, self.geom = policy, geom
        kv = geom.kv_heads
        self.state = EvictionState(
            k=torch.zeros(batch, kv, 0, geom.k_dim, dtype=dtype), v=torch.zeros(batch, kv, 0, geom.v_dim, dtype=dtype),
            pos=torch.zeros(batch, kv, 0, dtype=torch.long), score=torch.zeros(batch, kv, 0, dtype=torch.float64),
            queries=torch.zeros(batch, geom.heads, 0, geom.k_dim, dtype=dtype),
            query_pos=torch.zeros(0, dtype=torch.long),
        )

    def step(self, q: Tensor, k: Tensor, v: Tensor, scale: float, position: int) -> Tensor:
        # q: [B, heads, dq]; k: [B, kv, dq]; v: [B, kv, dv]
        s, batch, kv = self.state, q.shape[0], self.geom.kv_heads
        s.scale = scale
        w = self.policy.query_window
        if w:
            s.queries = torch.cat([s.queries, q[:, :, None]], dim=2)[:, :, -w:]
            s.query_pos = torch.cat([s.query_pos, torch.tensor([position])])[-w:]
        self.admit(k, v, position)
        out, probs = attend_dense(q, s.live(s.k), s.live(s.v), scale)  # probs: [B, heads, n]
        s.score[:, :, : s.n] += probs.view(batch, kv, self.geom.group, -1).sum(2).double()
        return out

    def admit(self, k: Tensor, v: Tensor, position: int) -> None:
        """Store the new token, evicting first if the budget is full (no attention, no scores).

        k: [B, kv, dq]; v: [B, kv, dv]. `step` calls it; so does the serving cache when it takes a
        prompt's K/V from a prefill service under a rule that ranks by position only (StreamingLLM)."""
        s, batch, kv = self.state, k.shape[0], self.geom.kv_heads
        s.seen = position + 1
        keep = self.policy.keep(s.seen)
        if s.n + 1 <= keep:  # room: the new token takes a fresh slot
            slot = torch.full((batch, kv), s.n, dtype=torch.long)
            s.n += 1
            s.k, s.v, s.pos, s.score = (grow(t, s.n) for t in (s.k, s.v, s.pos, s.score))
        else:  # full: budgets only grow by <= 1 token a step, so one victim makes room
            slot = self._victim(keep)  # [B, kv]
        self._write(slot, k, v, position)

    def _victim(self, keep: int) -> Tensor:
        """Slot of the lowest-priority live token per (sequence, KV head) -> [B, kv]."""
        s = self.state
        prio = self.policy.priority(s, keep)  # [B, kv, n]; the incoming token is not among them
        prio = prio + s.live(s.pos).double() * 1e-9  # ties: the older token goes
        return prio.argmin(dim=-1)

    def _write(self, slot: Tensor, k: Tensor, v: Tensor, position: int) -> None:
        # slot: [B, kv]; k: [B, kv, dk]; v: [B, kv, dv]
        s = self.state
        b_idx = torch.arange(slot.shape[0])[:, None]
        h_idx = torch.arange(slot.shape[1])[None, :]
        s.k[b_idx, h_idx, slot] = k.to(s.k.dtype)
        s.v[b_idx, h_idx, slot] = v.to(s.v.dtype)
        s.pos[b_idx, h_idx, slot] = position
        s.score[b_idx, h_idx, slot] = 0.0

    def stored_bits(self) -> float:
        g = self.geom
        return float(self.state.n * g.kv_heads * (g.k_dim + g.v_dim) * REFERENCE_BITS)

    def kept_positions(self) -> Tensor:
        """[B, kv_heads, n] positions currently kept, ascending (for inspection and tests)."""
        return self.state.live(self.state.pos).sort(dim=-1).values
