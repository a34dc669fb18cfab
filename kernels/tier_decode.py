"""A token tier's full-rank segment in a decode step, merged with its compressed segment: one kernel.

A decode query of a model with a token tier (zeroc/tier.py) attends its sequence's compressed keys
[S, length - W) through the paged decode kernel (`paged_decode.decode_partials`, unmerged), and its S + W
tier slots plus its own new row at full rank. Those full-rank keys are gathered from two places
(zeroc/policies/tier.py): a slot's compressed dims are its position's row in the cache's blocks, its tier
dims lie in the blocks the sequence borrowed, laid end to end (slot j's row is elements
[j * kv * width, (j + 1) * kv * width), width = tier_k + tier_v). `tier_decode_ref` (the reference, and the
torch and cpu backends' path) scores them where they lie and merges with the compressed partials in one
softmax, some 25 PyTorch ops a layer; `tier_decode` is one Triton program per (sequence, KV head) that
loads the S + W slots' compressed dims and tier dims as two tiles (each row's borrowed block looked up once,
not per element), scores the whole query group with two `tl.dot`s and its own row as a vector, and merges
in its epilogue. Compiled for sm_90 (tests/support/sm90_compile.py) that is 4 int64 loads a thread where a
per-element lookup made 258, 1,211 PTX lines against 2,777, and 146 registers with no spill against 255 and
504 spilled bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from zeroc_kernels.paged_decode import LOG2E
from zeroc_kernels.tuning import interpreting

try:  # optional on CPU-only machines; the reference serves there
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass(frozen=True)
class TierSlots:
    """Where each sequence's full-rank keys are in a decode step (the same in every layer)."""

    blocks: Tensor  # [B, H] (H = S + W tier slots) the cache block of slot j's compressed row
    offsets: Tensor  # [B, H] its row in that block
    tier_ids: Tensor  # [B, T] the blocks the sequence borrowed for its tier rows, in order
    seen: Tensor  # [B, H + 1] bool: whether the query sees slot j (held, and a sink or among its last W
    # tokens), then whether it sees its own new row at full rank (recent > 0)


def tier_decode_check(q: Tensor, pool: Tensor, k_dim: int, slots: TierSlots, k_own: Tensor, v_own: Tensor,
                      parts: Tensor, lses: Tensor) -> tuple[int, int]:
    """-> (tier_k, tier_v); ValueError where the shapes disagree."""
    b, heads, dq = q.shape
    kv, row = pool.shape[2], pool.shape[3]
    tier_k, tier_v = dq - k_dim, v_own.shape[-1] - (row - k_dim)
    if not 0 < k_dim < row or tier_k < 0 or tier_v < 0 or heads % kv:
        raise ValueError(f"tier decode: q {tuple(q.shape)} and v_own {tuple(v_own.shape)} do not fit a pool of "
                         f"{kv} KV heads x {row} compressed dims split at k_dim {k_dim}")
    if k_own.shape != (b, kv, dq) or v_own.shape[:2] != (b, kv) or slots.seen.shape != (b, slots.blocks.shape[1] + 1):
        raise ValueError("tier decode: k_own, v_own and the slots need one row per sequence and KV head")
    if parts.shape[:2] != (b, heads) or parts.shape[-1] != row - k_dim or lses.shape != parts.shape[:3]:
        raise ValueError(f"tier decode: partials {tuple(parts.shape)} and LSEs {tuple(lses.shape)} do not fit q")
    if not pool.is_contiguous():
        raise ValueError("tier decode: the pool must be contiguous (tier rows are addressed flat)")
    return tier_k, tier_v


def tier_decode_ref(
    q: Tensor,  # [B, heads, k_dim + tier_k] full-rank queries: compressed dims first
    pool: Tensor,  # [blocks, block_size, kv, k_dim + v_dim] the layer's pool (contiguous)
    k_dim: int,
    slots: TierSlots,
    k_own: Tensor,  # [B, kv, k_dim + tier_k] each sequence's new key at full rank
    v_own: Tensor,  # [B, kv, v_dim + tier_v]
    parts: Tensor,  # [B, heads, P, v_dim] the compressed segment's partial outputs
    lses: Tensor,  # [B, heads, P] their natural-log LSEs (-inf: no key)
    scale: float,
) -> Tensor:
    """-> [B, heads, v_dim + tier_v]: one softmax over both segments' keys. The compressed segment enters as
    its partials: merging outputs by log-sum-exp is a softmax in which each partial is one more key, whose
    score is its LSE and whose value is its output. Scores are summed over the two places a key's dims live
    (its compressed row, its tier row) instead of gathering whole rows: on the CPU the gathers and copies cost
    more than the arithmetic."""
    tier_k, tier_v = tier_decode_check(q, pool, k_dim, slots, k_own, v_own, parts, lses)
    b, held = slots.blocks.shape
    kv, heads = pool.shape[2], q.shape[1]
    v_dim, width = pool.shape[3] - k_dim, tier_k + tier_v
    tier = pool[slots.tier_ids].flatten(1)[:, : held * kv * width].view(b, held, kv, width).float()
    comp = pool[slots.blocks, slots.offsets].float()  # [B, H, kv, k_dim + v_dim]
    qg = q.float().view(b, kv, heads // kv, -1)  # [B, kv, group, k_dim + tier_k]
    slot_scores = (torch.einsum("bgjd,bkgd->bgjk", qg[..., :k_dim], comp[..., :k_dim])
                   + torch.einsum("bgjd,bkgd->bgjk", qg[..., k_dim:], tier[..., :tier_k]))  # [B, kv, group, H]
    own = torch.einsum("bgjd,bgd->bgj", qg, k_own.float())[..., None]  # [B, kv, group, 1]
    # a key not seen may hold anything, a NaN included: masked_fill overwrites its score
    scores = (torch.cat([slot_scores, own], -1) * scale).masked_fill(~slots.seen[:, None, None], float("-inf"))
    scores = torch.cat([scores, lses.float().view(b, kv, heads // kv, -1)], -1)  # the partials as keys
    lse = torch.logsumexp(scores, -1)  # [B, kv, group]
    probs = torch.exp(scores - lse.masked_fill(lse.isinf(), 0.0)[..., None])  # no key at all: 0
    p_slot, p_own, p_part = probs[..., :held], probs[..., held: held + 1], probs[..., held + 1:]
    seen = slots.seen[:, :held, None, None]  # and its value is zeroed, since 0 * NaN is NaN
    v_comp, v_tier = torch.where(seen, comp[..., k_dim:], 0.0), torch.where(seen, tier[..., tier_k:], 0.0)
    own_v = v_own.float()[:, :, None]  # [B, kv, 1, v_dim + tier_v]
    partials = parts.float().view(b, kv, heads // kv, -1, v_dim)
    kept = (torch.einsum("bgjk,bkgd->bgjd", p_slot, v_comp) + p_own * own_v[..., :v_dim]
            + torch.einsum("bgjp,bgjpd->bgjd", p_part, partials))  # [B, kv, group, v_dim]
    rest = torch.einsum("bgjk,bkgd->bgjd", p_slot, v_tier) + p_own * own_v[..., v_dim:]  # compressed: no tier dims
    return torch.cat([kept, rest], -1).reshape(b, heads, -1).to(q.dtype)


if triton is not None:

    @triton.jit
    def _tier_row(ids, start, d, PER_BLOCK: tl.constexpr, WIDTH: tl.constexpr, slot):
        # Flat pool offsets [K, D] of dims d [1, D] of the tier rows starting at flat `start` [K] of the blocks
        # `ids` lists: each row's block is looked up once (twice where it straddles two blocks), not per element.
        first, within = start // PER_BLOCK, start % PER_BLOCK  # a constexpr divisor: a multiply and a shift
        slot = slot & (WIDTH > 0)  # a layer with no tier dims borrowed no block: `ids` may be empty
        b0 = tl.load(ids + first, mask=slot, other=0).to(tl.int64)
        b1 = tl.load(ids + first + 1, mask=slot & (within + WIDTH > PER_BLOCK), other=0).to(tl.int64)
        at = within[:, None] + d
        return tl.where(at < PER_BLOCK, b0[:, None] * PER_BLOCK + at, b1[:, None] * PER_BLOCK + (at - PER_BLOCK))

    @triton.jit
    def _tier_decode_kernel(
        q_ptr, pool_ptr, blocks_ptr, offsets_ptr, ids_ptr, seen_ptr, k_own_ptr, v_own_ptr, parts_ptr, lses_ptr,
        out_ptr, qk_scale,
        stride_qb, stride_qh, stride_ps, stride_ph, stride_bb, stride_ib, stride_eb,
        stride_kb, stride_kh, stride_vb, stride_vh, stride_rb, stride_rh, stride_rp, stride_lb, stride_lh,
        stride_ob, stride_oh,
        HELD: tl.constexpr, K_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        KV: tl.constexpr, K_DIM: tl.constexpr, V_DIM: tl.constexpr, TIER_K: tl.constexpr, TIER_V: tl.constexpr,
        KD_PAD: tl.constexpr, VD_PAD: tl.constexpr, TK_PAD: tl.constexpr, TV_PAD: tl.constexpr,
        PER_BLOCK: tl.constexpr, P: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Program (sequence, KV head): its query group against its HELD tier slots, each a row of compressed dims
        # (in the cache's blocks) beside a row of tier dims (in the borrowed blocks): two tiles, two dots, summed;
        # then its own new row, a vector.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        heads = h * GROUP + g
        g_ok = g < GROUP
        j = tl.arange(0, K_PAD)
        dk, dv = tl.arange(0, KD_PAD)[None, :], tl.arange(0, VD_PAD)[None, :]
        tk, tv = tl.arange(0, TK_PAD)[None, :], tl.arange(0, TV_PAD)[None, :]
        slot = tl.load(seen_ptr + b * stride_eb + j, mask=j < HELD, other=0) != 0  # [K]
        own = tl.load(seen_ptr + b * stride_eb + HELD + tl.zeros([1], tl.int32)) != 0  # [1]
        blk = tl.load(blocks_ptr + b * stride_bb + j, mask=slot, other=0).to(tl.int64)
        off = tl.load(offsets_ptr + b * stride_bb + j, mask=slot, other=0).to(tl.int64)
        comp = (blk * PER_BLOCK + off * stride_ps + h * stride_ph)[:, None]  # [K, 1] a slot's compressed row
        start = j * (KV * (TIER_K + TIER_V)) + h * (TIER_K + TIER_V)  # [K] its tier row, flat in the borrowed blocks
        ids = ids_ptr + b * stride_ib
        row = slot[:, None]
        kc = tl.load(pool_ptr + comp + dk, mask=row & (dk < K_DIM), other=0.0)  # [K, KD]
        kt = tl.load(pool_ptr + _tier_row(ids, start, tk, PER_BLOCK, TIER_K + TIER_V, slot), mask=row & (tk < TIER_K),
                     other=0.0)  # [K, TK]
        q_at = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        qc = tl.load(q_at + dk, mask=g_ok[:, None] & (dk < K_DIM), other=0.0)  # [G, KD]
        qt = tl.load(q_at + K_DIM + tk, mask=g_ok[:, None] & (tk < TIER_K), other=0.0)  # [G, TK]
        if DOT_F32:  # the interpreter computes half-precision dots wrongly (see paged_decode)
            qc, qt, kc, kt = qc.to(tl.float32), qt.to(tl.float32), kc.to(tl.float32), kt.to(tl.float32)
        s = tl.dot(qc, tl.trans(kc), out_dtype=tl.float32, input_precision=PRECISION)
        s = tl.dot(qt, tl.trans(kt), acc=s, input_precision=PRECISION)  # [G, K]
        k_own = k_own_ptr + b * stride_kb + h * stride_kh
        own_c = tl.load(k_own + dk, mask=(dk < K_DIM) & own[None, :], other=0.0).to(tl.float32)  # [1, KD]
        own_t = tl.load(k_own + K_DIM + tk, mask=(tk < TIER_K) & own[None, :], other=0.0).to(tl.float32)  # [1, TK]
        s_own = tl.sum(qc.to(tl.float32) * own_c, 1) + tl.sum(qt.to(tl.float32) * own_t, 1)  # [G]
        s = tl.where(slot[None, :], s * qk_scale, float("-inf"))  # log2 units
        s_own = tl.where(own, s_own * qk_scale, float("-inf"))
        m = tl.maximum(tl.max(s, axis=1), s_own)
        m = tl.where(m == float("-inf"), 0.0, m)  # no key seen: every p is 0
        p = tl.exp2(s - m[:, None])
        p_own = tl.exp2(s_own - m)  # [G]
        l_f = tl.sum(p, axis=1) + p_own
        vc = tl.load(pool_ptr + comp + K_DIM + dv, mask=row & (dv < V_DIM), other=0.0)  # [K, VD]
        vt = tl.load(pool_ptr + _tier_row(ids, start, TIER_K + tv, PER_BLOCK, TIER_K + TIER_V, slot),
                     mask=row & (tv < TIER_V), other=0.0)  # [K, TV]
        if DOT_F32:
            vc, vt = vc.to(tl.float32), vt.to(tl.float32)
        v_own = v_own_ptr + b * stride_vb + h * stride_vh
        acc_c = tl.dot(p.to(vc.dtype), vc, out_dtype=tl.float32, input_precision=PRECISION)  # [G, VD]
        own_c = tl.load(v_own + dv, mask=(dv < V_DIM) & own[None, :], other=0.0).to(tl.float32)  # [1, VD]
        own_t = tl.load(v_own + V_DIM + tv, mask=(tv < TIER_V) & own[None, :], other=0.0).to(tl.float32)  # [1, TV]
        acc_c += p_own[:, None] * own_c
        acc_t = tl.dot(p.to(vt.dtype), vt, out_dtype=tl.float32, input_precision=PRECISION)  # [G, TV]
        acc_t += p_own[:, None] * own_t
        # natural log: a kernel sees no module global but a constexpr, so not LOG2E
        lse_f = tl.where(l_f > 0.0, (m + tl.log2(tl.where(l_f > 0.0, l_f, 1.0))) / 1.4426950408889634,
                         float("-inf"))
        # the merge with the compressed partials, by natural-log LSE; they have no tier dims
        parts = parts_ptr + b * stride_rb + heads[:, None] * stride_rh + dv
        lses = lses_ptr + b * stride_lb + heads * stride_lh
        top = lse_f
        for i in tl.static_range(P):
            top = tl.maximum(top, tl.load(lses + i, mask=g_ok, other=float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse_f - top)  # the full-rank segment's weight, 0 where it saw nothing
        total = w
        w = w / tl.where(l_f > 0.0, l_f, 1.0)
        acc_c = acc_c * w[:, None]
        for i in tl.static_range(P):
            w_i = tl.exp(tl.load(lses + i, mask=g_ok, other=float("-inf")) - top)
            part = tl.load(parts + i * stride_rp, mask=g_ok[:, None] & (dv < V_DIM), other=0.0).to(tl.float32)
            acc_c += w_i[:, None] * part
            total += w_i
        total = tl.where(total > 0.0, total, 1.0)[:, None]
        out = out_ptr + b * stride_ob + heads[:, None] * stride_oh
        tl.store(out + dv, (acc_c / total).to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (dv < V_DIM))
        tl.store(out + V_DIM + tv, (acc_t * w[:, None] / total).to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & (tv < TIER_V))


def tier_decode(q: Tensor, pool: Tensor, k_dim: int, slots: TierSlots, k_own: Tensor, v_own: Tensor,
                parts: Tensor, lses: Tensor, scale: float) -> Tensor:
    """Triton version of `tier_decode_ref` (same arguments and result)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    tier_k, tier_v = tier_decode_check(q, pool, k_dim, slots, k_own, v_own, parts, lses)
    b, heads = q.shape[:2]
    kv, row = pool.shape[2:]
    held, v_dim = slots.blocks.shape[1], row - k_dim
    q, k_own, v_own, parts = q.contiguous(), k_own.contiguous(), v_own.contiguous(), parts.contiguous()
    lses = lses.float().contiguous()
    blocks, offsets = slots.blocks.contiguous(), slots.offsets.contiguous()
    if blocks.stride() != offsets.stride():
        raise ValueError("tier decode: the slots' blocks and offsets need one shape")
    ids, seen = slots.tier_ids.contiguous(), slots.seen.contiguous().view(torch.uint8)
    out = torch.empty(b, heads, v_dim + tier_v, dtype=q.dtype, device=q.device)
    group, pad = heads // kv, lambda n: max(16, triton.next_power_of_2(n))
    _tier_decode_kernel[(b, kv)](
        q, pool, blocks, offsets, ids, seen, k_own, v_own, parts, lses, out, scale * LOG2E,
        q.stride(0), q.stride(1), pool.stride(1), pool.stride(2), blocks.stride(0), ids.stride(0),
        seen.stride(0), k_own.stride(0), k_own.stride(1), v_own.stride(0), v_own.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2), lses.stride(0), lses.stride(1), out.stride(0), out.stride(1),
        HELD=held, K_PAD=pad(held), GROUP=group, GROUP_PAD=pad(group), KV=kv, K_DIM=k_dim, V_DIM=v_dim,
        TIER_K=tier_k, TIER_V=tier_v, KD_PAD=pad(k_dim), VD_PAD=pad(v_dim), TK_PAD=pad(tier_k), TV_PAD=pad(tier_v),
        PER_BLOCK=pool.stride(0), P=parts.shape[2], DOT_F32=interpreting(),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
