"""Ulysses-style sequence-parallel prefill with one all-to-all each way per layer.

The prompt is cut into P contiguous shards, one per rank. In every layer each rank computes
q, k, v for its own tokens (already rank-reduced in a ZeroC model, so it ships fewer bytes),
then ONE all-to-all moves them from sequence-split to head-split: rank r receives, for every
token of the prompt, the query heads it owns and the KV heads those query heads read. It runs
causal attention over the whole prompt for its heads, and ONE all-to-all sends each shard's
outputs back to the rank that owns those tokens. Query heads are split as evenly as possible
(`torch.tensor_split`), so P need not divide the head count; a KV head read by query heads on
several ranks is sent to each of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from zeroc.model import Transformer


@dataclass(frozen=True)
class HeadSplit:
    """Which heads one rank owns after the all-to-all."""

    q_heads: list[int]
    kv_heads: list[int]


def split_heads(n_heads: int, n_kv: int, world: int) -> list[HeadSplit]:
    if world > n_heads:
        raise ValueError(f"cannot split {n_heads} query heads over {world} ranks")
    group = n_heads // n_kv
    parts = torch.tensor_split(torch.arange(n_heads), world)
    return [HeadSplit(p.tolist(), sorted({h // group for h in p.tolist()})) for p in parts]


@dataclass
class CommStats:
    """Bytes this rank sent through all-to-all, and the seconds spent in it, per layer."""

    bytes_sent: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


class UlyssesAttend:
    """An `attend` closure for `Transformer.forward_attend` on one rank of a process group."""

    def __init__(self, shard_lens: list[int], n_heads: int, rank: int, world: int, stats: CommStats | None = None):
        self.shard_lens, self.rank, self.world, self.n_heads = shard_lens, rank, world, n_heads
        split_heads(n_heads, 1, world)  # ValueError if the query heads do not go round
        self.stats = stats or CommStats()

    def _all_to_all(self, send: list[Tensor], recv_numels: list[int], dtype: torch.dtype) -> list[Tensor]:
        """One all_to_all_single: send[d] goes to rank d; returns what each rank sent here."""
        flat = torch.cat([s.reshape(-1) for s in send])
        out = torch.empty(sum(recv_numels), dtype=dtype, device=flat.device)
        t0 = time.perf_counter()
        dist.all_to_all_single(out, flat, output_split_sizes=recv_numels,
                               input_split_sizes=[s.numel() for s in send])
        self.stats.seconds.append(time.perf_counter() - t0)
        self.stats.bytes_sent.append(flat.numel() * flat.element_size())
        return list(torch.split(out, recv_numels))

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # q: [T_local, heads, dq]; k: [T_local, kv_heads, dq]; v: [T_local, kv_heads, dv]
        # kv_heads is per layer: a layer with per-KV-head ranks hands over one row of all its heads' dims
        dq, dv, n_kv = q.shape[-1], v.shape[-1], k.shape[-2]
        splits, group = split_heads(self.n_heads, n_kv, self.world), self.n_heads // n_kv
        mine = splits[self.rank]
        # Sequence-split -> head-split: one packed row per token for each destination rank.
        send = [torch.cat([q[:, s.q_heads].flatten(1), k[:, s.kv_heads].flatten(1), v[:, s.kv_heads].flatten(1)], 1)
                for s in splits]
        width = len(mine.q_heads) * dq + len(mine.kv_heads) * (dq + dv)
        parts = self._all_to_all(send, [n * width for n in self.shard_lens], q.dtype)
        rows = torch.cat([p.view(n, width) for p, n in zip(parts, self.shard_lens)])  # [T, width]
        nq, nkv = len(mine.q_heads), len(mine.kv_heads)
        qh = rows[:, : nq * dq].view(-1, nq, dq)
        kh = rows[:, nq * dq: (nq + nkv) * dq].view(-1, nkv, dq)
        vh = rows[:, (nq + nkv) * dq:].view(-1, nkv, dv)
        kv_index = torch.tensor([mine.kv_heads.index(h // group) for h in mine.q_heads])
        out = F.scaled_dot_product_attention(  # [nq, T, dv]
            qh.transpose(0, 1), kh[:, kv_index].transpose(0, 1), vh[:, kv_index].transpose(0, 1),
            is_causal=True, scale=scale,
        ).transpose(0, 1)  # [T, nq, dv]
        # Head-split -> sequence-split: each shard's rows go back to the rank that owns them.
        back = list(torch.split(out, self.shard_lens))
        t_local = self.shard_lens[self.rank]
        recv = self._all_to_all(back, [t_local * len(s.q_heads) * dv for s in splits], q.dtype)
        return torch.cat([r.view(t_local, len(s.q_heads), dv) for r, s in zip(recv, splits)], 1)


def shard_bounds(total: int, world: int) -> list[int]:
    """Contiguous shard lengths, as even as possible."""
    return [len(p) for p in torch.tensor_split(torch.arange(total), world)]


KvHook = Callable[[int, Tensor, Tensor], None]  # (layer, k [T_rank, kv_heads, dq], v [T_rank, kv_heads, dv])


@torch.inference_mode()
def sp_prefill(model: Transformer, tokens: Tensor, rank: int, world: int,
               stats: CommStats | None = None, on_kv: KvHook | None = None) -> Tensor:
    """This rank's share of a sequence-parallel prefill of `tokens` ([T], the whole prompt).

    Must be called by every rank of the default process group with the same tokens. `on_kv` sees
    each layer's keys (after RoPE) and values of this rank's tokens, as a paged cache would store them.
    -> logits of this rank's contiguous shard of tokens [T_rank, vocab]
    """
    lens = shard_bounds(tokens.numel(), world)
    start = sum(lens[:rank])
    positions = torch.arange(start, start + lens[rank])
    cfg = model.config
    ulysses = UlyssesAttend(lens, cfg.num_attention_heads, rank, world, stats)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        if on_kv is not None:
            on_kv(layer, k, v)
        return ulysses(layer, q, k, v, scale)

    return model.forward_attend(tokens[start: start + lens[rank]], positions, attend)
