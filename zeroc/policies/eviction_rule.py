"""The token-eviction rule shared by StreamingLLM, H2O and SnapKV, on one layer's kept tokens.

At step t (t tokens seen, the new one included) a layer may hold `policy.keep(t)` tokens. If the
new token does not fit, the policy ranks the tokens already kept and the lowest-ranked one is
dropped *before* attending (the budget grows by at most one token a step, so one victim always
makes room, and the new token is always kept), so attention at step t never sees more than the
budget allows. Kept sets are per sequence and per KV head (H2O and SnapKV rank per head); every
(sequence, head) keeps the same count, so the state stays rectangular; the new token reuses the
victim's slot. The paged pools (`zeroc.policies.eviction`) gathers a sequence's slots into an
`EvictionCache`, steps it token by token and scatters it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's eviction state needs to know about its layer."""

    layer: int
    heads: int  # query heads
    kv_heads: int
    k_dim: int
    v_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def attend_dense(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """GQA attention of one new query per sequence over its kept tokens (no mask: all are past).

    q: [B, heads, dq]; k: [B, kv_heads, n, dq]; v: [B, kv_heads, n, dv]
    -> (out [B, heads, dv], probs [B, heads, n]); heads of a KV head's group are adjacent.
    """
    b, heads, dq = q.shape
    kv = k.shape[1]
    work = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least, as the model's SDPA does
    qg = q.view(b, kv, heads // kv, dq).to(work)
    scores = torch.einsum("bkgd,bknd->bkgn", qg, k.to(work)) * scale
    probs = torch.softmax(scores, dim=-1)  # [B, kv, group, n]
    out = torch.einsum("bkgn,bkne->bkge", probs, v.to(work))
    return out.reshape(b, heads, -1).to(q.dtype), probs.reshape(b, heads, -1)


def grow(buf: Tensor, size: int) -> Tensor:
    """buf with room for at least `size` slots along dim 2 (capacity doubles, new slots are zero).

    buf: [B, kv_heads, capacity, *rest]. Geometric growth keeps a T-token stream at O(T) copies.
    """
    cap = buf.shape[2]
    if size <= cap:
        return buf
    extra = max(cap, 16, size - cap)
    return torch.cat([buf, buf.new_zeros(buf.shape[0], buf.shape[1], extra, *buf.shape[3:])], dim=2)


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


class EvictionRule(Protocol):
    """What `EvictionCache` asks of an eviction method."""

    query_window: int  # how many recent queries the state must remember (SnapKV's window)

    def keep(self, seen: int) -> int: ...

    def priority(self, state: EvictionState, keep: int) -> Tensor: ...


def protect_recent(pos: Tensor, seen: int, recent: int) -> Tensor:
    # pos: [B, kv, n] -> [B, kv, n] float64: PROTECTED + position for the `recent` latest positions, else 0
    is_recent = pos >= seen - recent
    return torch.where(is_recent, PROTECTED + pos.double(), torch.zeros_like(pos, dtype=torch.float64))


class EvictionCache:
    """One layer's kept tokens for B sequences that advance in lockstep, under `policy`'s rule (an
    `EvictionMethod`: `keep`, `priority`, `query_window`). The paged pools runs it per sequence on the
    slots it gathers; the dense test oracle runs it batched."""

    def __init__(self, policy: EvictionRule, geom: LayerGeometry, batch: int, dtype: torch.dtype):
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
        return float(self.state.n * g.kv_heads * (g.k_dim + g.v_dim) * 16)  # at the 16-bit reference

    def kept_positions(self) -> Tensor:
        """[B, kv_heads, n] positions currently kept, ascending (for inspection and tests)."""
        return self.state.live(self.state.pos).sort(dim=-1).values
