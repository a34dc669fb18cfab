"""The QKV epilogue of a ZeroC attention layer, in one pass over the GEMM output.

Fold mode (`qkv_epilogue`): after the rank-reduced QKV projection, RoPE on the kept pairs of q
and k (each KV head keeps its own pairs, so each has its own frequencies; query heads use their
group's), then K and V go straight into their paged cache slots. No full-width K ever exists in
memory. Layout of a compressed head: kept first halves, then kept second halves (rotate_half pairs).

Rotate mode (`qkv_rotate_epilogue`): q and k come out of the GEMM at full head width; RoPE on every
pair, then each KV head's bases map them to rank r (q' = A_g^T q for every query head of group g,
k' = B_g^T k), and only the rank-r K (and the rank-rv V) are written to the cache. The full-width
post-RoPE q and k live in registers only.

`tier_qkv`: a fold layer with a full-rank token tier (zeroc/tier.py) attends with q, k and v at full rank, each the
compressed part joined to the tier's dims: RoPE on q and k at the kept pairs' frequencies and on their tier dims
at the dropped pairs', in one kernel that writes the joined rows, where RoPE per tensor and the joins took seven
kernels a layer.

`rope` is RoPE alone, one kernel per tensor, for the layers the epilogues do not serve (per-KV-head ranks, a
token tier's dims, the dense forward): computing cos and sin in registers, where the eager path builds tables
and applies them in some thirteen kernels per q, k pair.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zeroc_kernels.tuning import interpreting

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def apply_rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE from tables as Hugging Face's Llama applies it, each product and sum rounded in x's dtype.
    x: [*P, heads, d]; cos, sin: [*P, heads or 1, d] in the rotate_half layout (pairs (i, i + d/2)) -> [*P, heads, d]"""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_ref(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """RoPE (rotate_half pairs) in fp32, rounded once to x's dtype. x: [*P, heads, r]; positions: [*P];
    inv_freq: [R, r/2], R = 1 or R dividing heads (head h turns by row h // (heads / R)) -> [*P, heads, r]"""
    _check_rope(x, positions, inv_freq)
    inv_freq = inv_freq.float().repeat_interleave(x.shape[-2] // inv_freq.shape[0], 0)
    freqs = positions.float()[..., None, None] * inv_freq  # [*P, heads, r/2]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1).float()
    return (x.float() * cos + rotated * sin).to(x.dtype)


def _check_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> None:
    heads, r = x.shape[-2:]
    if r % 2 or inv_freq.dim() != 2 or inv_freq.shape[1] != r // 2 or heads % inv_freq.shape[0]:
        raise ValueError(f"RoPE of {heads} heads x {r} dims needs frequencies [R, {r // 2}] with R dividing "
                         f"{heads}, got {tuple(inv_freq.shape)}")
    if positions.shape != x.shape[:-2]:
        raise ValueError(f"RoPE positions {tuple(positions.shape)} for rows {tuple(x.shape[:-2])}")


def qkv_epilogue_ref(
    q: Tensor,  # [N, heads, r] from the GEMM, before RoPE
    k: Tensor,  # [N, kv_heads, r]
    v: Tensor,  # [N, kv_heads, rv]
    positions: Tensor,  # [N]
    inv_freq: Tensor,  # [kv_heads or 1, r/2] frequencies of each KV head's kept pairs (1 row: shared by all)
    slot_mapping: Tensor,  # [N]
    k_pool: Tensor,  # [num_blocks, block_size, kv_heads, r], written in place
    v_pool: Tensor,  # [num_blocks, block_size, kv_heads, rv], written in place
) -> Tensor:
    """-> q after RoPE [N, heads, r]; K (after RoPE) and V land in their cache slots."""
    k_pool.view(-1, *k_pool.shape[2:])[slot_mapping] = rope_ref(k, positions, inv_freq).to(k_pool.dtype)
    v_pool.view(-1, *v_pool.shape[2:])[slot_mapping] = v.to(v_pool.dtype)
    return rope_ref(q, positions, inv_freq)


def qkv_rotate_epilogue_ref(
    q: Tensor,  # [N, heads, d] from the GEMM, before RoPE
    k: Tensor,  # [N, kv_heads, d]
    v: Tensor,  # [N, kv_heads, rv]
    positions: Tensor,  # [N]
    inv_freq: Tensor,  # [1, d/2] frequencies of every RoPE pair
    q_basis: Tensor,  # [kv_heads, d, r] A_g, shared by the query heads of group g
    k_basis: Tensor,  # [kv_heads, d, r] B_g
    slot_mapping: Tensor,  # [N]
    k_pool: Tensor,  # [num_blocks, block_size, kv_heads, r], written in place
    v_pool: Tensor,  # [num_blocks, block_size, kv_heads, rv], written in place
) -> Tensor:
    """-> q' [N, heads, r]; k' = B^T RoPE(k) and V land in their cache slots."""
    kv = k.shape[1]
    q_rot = rope_ref(q, positions, inv_freq).float().unflatten(1, (kv, -1))  # [N, kv, group, d]
    k_rot = rope_ref(k, positions, inv_freq).float()
    k_pool.view(-1, *k_pool.shape[2:])[slot_mapping] = torch.einsum("ngd,gdr->ngr", k_rot,
                                                                    k_basis.float()).to(k_pool.dtype)
    v_pool.view(-1, *v_pool.shape[2:])[slot_mapping] = v.to(v_pool.dtype)
    return torch.einsum("ngjd,gdr->ngjr", q_rot, q_basis.float()).flatten(1, 2).to(q.dtype)


def tier_qkv_ref(
    q: Tensor,  # [*P, heads, r] from the GEMM, before RoPE
    k: Tensor,  # [*P, kv_heads, r]
    v: Tensor,  # [*P, kv_heads, rv]
    q_tier: Tensor,  # [*P, heads, d - r] the dropped RoPE pairs' rows, before RoPE
    k_tier: Tensor,  # [*P, kv_heads, d - r]
    v_tier: Tensor,  # [*P, kv_heads, d - rv] the V complement
    positions: Tensor,  # [*P]
    inv_freq: Tensor,  # [kv_heads or 1, r/2] the kept pairs' frequencies
    tier_inv_freq: Tensor,  # [kv_heads or 1, (d - r)/2] the dropped pairs'
) -> tuple[Tensor, Tensor, Tensor]:
    """-> q_full [*P, heads, d], k_full [*P, kv_heads, d], v_full [*P, kv_heads, d]: the compressed dims (q, k
    after RoPE), then the tier's."""
    return (torch.cat([rope_ref(q, positions, inv_freq), rope_ref(q_tier, positions, tier_inv_freq)], -1),
            torch.cat([rope_ref(k, positions, inv_freq), rope_ref(k_tier, positions, tier_inv_freq)], -1),
            torch.cat([v, v_tier], -1))


if triton is not None:

    @triton.jit
    def _rope_tile(x, c, s, mask, HALF: tl.constexpr):
        # x: [T, HALF] pointers to rows' first halves (rotate_half pairs: i and HALF + i); c, s: [T, HALF]
        # -> both rotated halves, fp32
        lo = tl.load(x, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
        return lo * c - hi * s, hi * c + lo * s

    @triton.jit
    def _store_halves(dst, lo, hi, mask, HALF: tl.constexpr):
        tl.store(dst, lo.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, hi.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, pos_ptr, freq_ptr, out_ptr, n, heads, heads_per_row, stride_xn, stride_xh, stride_f,
                     HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEADS_PER_PROGRAM: tl.constexpr):
        # Program: BLOCK_N tokens of HEADS_PER_PROGRAM heads that share a frequency row, cos and sin once for all
        # of them; out is contiguous [n, heads, 2 * HALF].
        t = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        first = tl.program_id(1) * HEADS_PER_PROGRAM
        i = tl.arange(0, HALF_PAD)
        ok = (t[:, None] < n) & (i[None, :] < HALF)
        angle = tl.load(pos_ptr + t, mask=t < n, other=0).to(tl.float32)[:, None] * tl.load(
            freq_ptr + (first // heads_per_row) * stride_f + i, mask=i < HALF, other=0.0)[None, :]  # [N, HALF]
        c, s = tl.cos(angle), tl.sin(angle)
        for h in tl.static_range(HEADS_PER_PROGRAM):
            lo, hi = _rope_tile(x_ptr + t[:, None] * stride_xn + (first + h) * stride_xh + i[None, :], c, s, ok, HALF)
            _store_halves(out_ptr + (t[:, None] * heads + first + h) * (2 * HALF) + i[None, :], lo, hi, ok, HALF)

    @triton.jit
    def _qkv_epilogue_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, freq_ptr, slots_ptr, kpool_ptr, vpool_ptr, qout_ptr, n,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_f,
        HEADS: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        RV: tl.constexpr, RV_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One program per (tile of BLOCK_T tokens, KV head g): cos and sin once for the tile, then every query
        # head of the group, K into its slots, V into its slots; rows go as [BLOCK_T, HALF] tiles (wide loads).
        g = tl.program_id(1)
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        ok = t < n
        i = tl.arange(0, HALF_PAD)
        rows = ok[:, None] & (i[None, :] < HALF)
        angle = tl.load(pos_ptr + t, mask=ok, other=0).to(tl.float32)[:, None] * tl.load(
            freq_ptr + g * stride_f + i, mask=i < HALF, other=0.0)[None, :]  # [T, HALF]
        c, s = tl.cos(angle), tl.sin(angle)
        for h in range(g * (HEADS // KV), (g + 1) * (HEADS // KV)):
            lo, hi = _rope_tile(q_ptr + t[:, None] * stride_qn + h * stride_qh + i[None, :], c, s, rows, HALF)
            _store_halves(qout_ptr + (t[:, None] * HEADS + h) * (2 * HALF) + i[None, :], lo, hi, rows, HALF)
        slot = tl.load(slots_ptr + t, mask=ok, other=0).to(tl.int64)[:, None]
        lo, hi = _rope_tile(k_ptr + t[:, None] * stride_kn + g * stride_kh + i[None, :], c, s, rows, HALF)
        _store_halves(kpool_ptr + (slot * KV + g) * (2 * HALF) + i[None, :], lo, hi, rows, HALF)
        j = tl.arange(0, RV_PAD)[None, :]
        vm = ok[:, None] & (j < RV)
        v = tl.load(v_ptr + t[:, None] * stride_vn + g * stride_vh + j, mask=vm, other=0.0)
        tl.store(vpool_ptr + (slot * KV + g) * RV + j, v.to(vpool_ptr.dtype.element_ty), mask=vm)

    @triton.jit
    def _basis_halves(basis_ptr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                      DOT_F32: tl.constexpr):
        # a [2 * HALF, R] row-major basis as its top and bottom halves [HALF_PAD, R_PAD], zero-padded
        i = tl.arange(0, HALF_PAD)[:, None]
        j = tl.arange(0, R_PAD)[None, :]
        bm = (i < HALF) & (j < R)
        top = tl.load(basis_ptr + i * R + j, mask=bm, other=0.0)
        bottom = tl.load(basis_ptr + (HALF + i) * R + j, mask=bm, other=0.0)
        if DOT_F32:
            top, bottom = top.to(tl.float32), bottom.to(tl.float32)
        return top, bottom

    @triton.jit
    def _rope_project_tile(x_ptr, rows, m, c, s, top, bottom, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                           PRECISION: tl.constexpr):
        # x rows [T, 2 * HALF] at element offsets `rows` (m: the [T, HALF_PAD] mask): RoPE by the tile's c, s on
        # every pair, rounded to x's dtype (as the reference's RoPE output is), then @ [top; bottom] on the
        # tensor cores -> [T, R_PAD]
        i = tl.arange(0, HALF_PAD)
        lo = tl.load(x_ptr + rows[:, None] + i[None, :], mask=m, other=0.0)
        hi = tl.load(x_ptr + rows[:, None] + HALF + i[None, :], mask=m, other=0.0)
        lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
        rot_lo = (lo_f * c - hi_f * s).to(lo.dtype)
        rot_hi = (hi_f * c + lo_f * s).to(lo.dtype)
        out = tl.dot(rot_lo.to(top.dtype), top, out_dtype=tl.float32, input_precision=PRECISION)
        return tl.dot(rot_hi.to(top.dtype), bottom, acc=out, out_dtype=tl.float32, input_precision=PRECISION)

    @triton.jit
    def _qkv_rotate_epilogue_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, freq_ptr, qb_ptr, kb_ptr, slots_ptr, kpool_ptr, vpool_ptr, qout_ptr, n,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        HEADS: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        R: tl.constexpr, R_PAD: tl.constexpr, RV: tl.constexpr, RV_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program per (tile of BLOCK_T tokens, KV head g): the tile's cos/sin and each basis are computed or
        # loaded once and serve every query head of the group ([BLOCK_T, d] x [d, r] dots), then K; then V.
        g = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = t < n
        t64 = t.to(tl.int64)
        i = tl.arange(0, HALF_PAD)
        j = tl.arange(0, R_PAD)
        m = ok[:, None] & (i[None, :] < HALF)
        angle = tl.load(pos_ptr + t, mask=ok, other=0).to(tl.float32)[:, None] * tl.load(
            freq_ptr + i, mask=i < HALF, other=0.0)[None, :]
        c, s = tl.cos(angle), tl.sin(angle)
        basis = g * 2 * HALF * R
        top, bottom = _basis_halves(qb_ptr + basis, HALF, HALF_PAD, R, R_PAD, DOT_F32)
        for h in range(g * (HEADS // KV), (g + 1) * (HEADS // KV)):
            out = _rope_project_tile(q_ptr, t64 * stride_qn + h * stride_qh, m, c, s, top, bottom, HALF, HALF_PAD,
                                     PRECISION)
            tl.store(qout_ptr + (t64 * HEADS + h)[:, None] * R + j[None, :], out.to(qout_ptr.dtype.element_ty),
                     mask=ok[:, None] & (j[None, :] < R))
        slot = tl.load(slots_ptr + t, mask=ok, other=0).to(tl.int64)
        top, bottom = _basis_halves(kb_ptr + basis, HALF, HALF_PAD, R, R_PAD, DOT_F32)
        kout = _rope_project_tile(k_ptr, t64 * stride_kn + g * stride_kh, m, c, s, top, bottom, HALF, HALF_PAD,
                                  PRECISION)
        tl.store(kpool_ptr + (slot * KV + g)[:, None] * R + j[None, :], kout.to(kpool_ptr.dtype.element_ty),
                 mask=ok[:, None] & (j[None, :] < R))
        jv = tl.arange(0, RV_PAD)
        vm = ok[:, None] & (jv[None, :] < RV)
        vrow = tl.load(v_ptr + (t64 * stride_vn + g * stride_vh)[:, None] + jv[None, :], mask=vm, other=0.0)
        tl.store(vpool_ptr + (slot * KV + g)[:, None] * RV + jv[None, :], vrow.to(vpool_ptr.dtype.element_ty),
                 mask=vm)

    @triton.jit
    def _rope_join(src, stride_n, stride_h, t, head, c, s, m, dst, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        # RoPE (the tile's c, s [T, HALF_PAD], mask m) on head `head` of rows t of src, into dst [T, 2 * HALF]
        i = tl.arange(0, HALF_PAD)[None, :]
        lo, hi = _rope_tile(src + t[:, None] * stride_n + head * stride_h + i, c, s, m, HALF)
        _store_halves(dst + i, lo, hi, m, HALF)

    @triton.jit
    def _copy_join(src, stride_n, stride_h, t, head, ok, dst, W: tl.constexpr, W_PAD: tl.constexpr):
        # head `head` of rows t of src [T, W] into dst
        j = tl.arange(0, W_PAD)[None, :]
        m = ok[:, None] & (j < W)
        tl.store(dst + j, tl.load(src + t[:, None] * stride_n + head * stride_h + j, mask=m, other=0.0), mask=m)

    @triton.jit
    def _tier_qkv_kernel(
        q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, vt_ptr, pos_ptr, freq_ptr, tfreq_ptr, qout_ptr, kout_ptr, vout_ptr, n,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        stride_qtn, stride_qth, stride_ktn, stride_kth, stride_vtn, stride_vth, stride_f, stride_tf,
        HEADS: tl.constexpr, KV: tl.constexpr, HC: tl.constexpr, HC_PAD: tl.constexpr, HT: tl.constexpr,
        HT_PAD: tl.constexpr, RV: tl.constexpr, RV_PAD: tl.constexpr, VT: tl.constexpr, VT_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        # One program per (tile of BLOCK_T tokens, KV head g): cos and sin of both frequency sets once for the
        # tile, then every query head of the group, K and V, each row written joined: [compressed | tier].
        g = tl.program_id(1)
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        ok = t < n
        pos = tl.load(pos_ptr + t, mask=ok, other=0).to(tl.float32)[:, None]
        i = tl.arange(0, HC_PAD)
        ac = pos * tl.load(freq_ptr + g * stride_f + i, mask=i < HC, other=0.0)[None, :]  # [T, HC_PAD]
        cc, sc, mc = tl.cos(ac), tl.sin(ac), ok[:, None] & (i[None, :] < HC)
        j = tl.arange(0, HT_PAD)
        at = pos * tl.load(tfreq_ptr + g * stride_tf + j, mask=j < HT, other=0.0)[None, :]  # [T, HT_PAD]
        ct, st, mt = tl.cos(at), tl.sin(at), ok[:, None] & (j[None, :] < HT)
        D: tl.constexpr = 2 * (HC + HT)
        for h in range(g * (HEADS // KV), (g + 1) * (HEADS // KV)):
            row = qout_ptr + (t[:, None] * HEADS + h) * D
            _rope_join(q_ptr, stride_qn, stride_qh, t, h, cc, sc, mc, row, HC, HC_PAD)
            if HT > 0:
                _rope_join(qt_ptr, stride_qtn, stride_qth, t, h, ct, st, mt, row + 2 * HC, HT, HT_PAD)
        row = kout_ptr + (t[:, None] * KV + g) * D
        _rope_join(k_ptr, stride_kn, stride_kh, t, g, cc, sc, mc, row, HC, HC_PAD)
        if HT > 0:
            _rope_join(kt_ptr, stride_ktn, stride_kth, t, g, ct, st, mt, row + 2 * HC, HT, HT_PAD)
        row = vout_ptr + (t[:, None] * KV + g) * (RV + VT)
        _copy_join(v_ptr, stride_vn, stride_vh, t, g, ok, row, RV, RV_PAD)
        if VT > 0:
            _copy_join(vt_ptr, stride_vtn, stride_vth, t, g, ok, row + RV, VT, VT_PAD)


def _rows3(x: Tensor, n: int) -> Tensor:
    """x [*P, heads, w] as [n, heads, w] rows with a dense last dim: a view of a fused projection's column slice."""
    x3 = x.reshape(n, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _pad(w: int) -> int:
    """A width's power-of-two tile (at least 2)."""
    return max(2, triton.next_power_of_2(w))


def _freq_stride(freqs: Tensor) -> int:
    """The row stride the kernels read `_freq_rows`' rows by: 0 where one row serves every KV head."""
    return freqs.stride(0) if freqs.shape[0] > 1 else 0


def _freq_rows(inv_freq: Tensor) -> Tensor:
    """inv_freq [rows, r/2] as the kernels read it: fp32 with dense rows, which they address by row stride, so a
    slice of a layer's table or a row shared by every head is not copied."""
    freqs = inv_freq.float()
    return freqs if freqs.stride(-1) == 1 else freqs.contiguous()


FOLD_BLOCK_T = 16  # tokens per program of the fold epilogue: a decode step of 64 rows is 4 programs per KV head


def qkv_epilogue(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor, slot_mapping: Tensor,
                 k_pool: Tensor, v_pool: Tensor) -> Tensor:
    """Triton version of `qkv_epilogue_ref` (same arguments; pools must be contiguous). Tiles of
    FOLD_BLOCK_T tokens per KV head, where one program per (token, query head) read its row 2 bytes at a time
    (sm_90 PTX) and a 16,384-token prompt launched half a million programs."""
    n, heads, r = q.shape
    kv, rv = k.shape[1], v.shape[2]
    out = torch.empty_like(q)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    freqs = _freq_rows(inv_freq)  # one row per KV head, or one row for all (stride 0): no copy per layer
    _qkv_epilogue_kernel[(triton.cdiv(n, FOLD_BLOCK_T), kv)](
        q, k, v, positions.contiguous(), freqs, slot_mapping.contiguous(), k_pool, v_pool,
        out, n, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        _freq_stride(freqs),
        HEADS=heads, KV=kv, HALF=r // 2, HALF_PAD=triton.next_power_of_2(r // 2), RV=rv,
        RV_PAD=triton.next_power_of_2(rv), BLOCK_T=FOLD_BLOCK_T,
    )
    return out


ROTATE_BLOCK_T = 64  # tokens per program of the rotate epilogue (the M of its dots)


def qkv_rotate_epilogue(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor, q_basis: Tensor,
                        k_basis: Tensor, slot_mapping: Tensor, k_pool: Tensor, v_pool: Tensor) -> Tensor:
    """Triton version of `qkv_rotate_epilogue_ref` (same arguments; pools must be contiguous).

    Tiles of ROTATE_BLOCK_T tokens per KV head: RoPE in registers, then the [d, r] bases as tensor-core
    dots (fp32 accumulate), so each basis is read once per tile instead of once per row.
    """
    n, heads, d = q.shape
    kv, rv, r = k.shape[1], v.shape[2], q_basis.shape[2]
    out = torch.empty(n, heads, r, dtype=q.dtype, device=q.device)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_basis, k_basis = q_basis.contiguous(), k_basis.to(q_basis.dtype).contiguous()
    _qkv_rotate_epilogue_kernel[(triton.cdiv(n, ROTATE_BLOCK_T), kv)](
        q, k, v, positions.contiguous(), inv_freq.float().contiguous(), q_basis, k_basis,
        slot_mapping.contiguous(), k_pool, v_pool, out, n, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), HEADS=heads, KV=kv, HALF=d // 2, HALF_PAD=max(16, triton.next_power_of_2(d // 2)),
        R=r, R_PAD=max(16, triton.next_power_of_2(r)), RV=rv, RV_PAD=triton.next_power_of_2(rv),
        BLOCK_T=ROTATE_BLOCK_T,
        # The CPU interpreter's half-precision tl.dot is wrong (see kernels/README.md): fp32 operands there.
        DOT_F32=interpreting(), PRECISION="ieee" if q_basis.dtype == torch.float32 else "tf32",
    )
    return out


ROPE_HEADS_PER_PROGRAM = 4
ROPE_BLOCK_N = 16  # tokens per program of `rope` and `tier_qkv` on a GPU


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Triton version of `rope_ref` (same arguments; x's last dim dense or copied so) -> a new [*P, heads, r]."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_rope(x, positions, inv_freq)
    heads, r = x.shape[-2:]
    n = positions.numel()
    x3 = _rows3(x, n)  # a view for the column slices of a fused projection's output
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    if n and r:
        block_n = 64 if interpreting() else ROPE_BLOCK_N  # the interpreter pays per program
        freqs = _freq_rows(inv_freq)  # a per-head run's frequencies: a row slice of its layer's
        per_row = heads // inv_freq.shape[0]
        # heads that share a frequency row share cos and sin: up to 4 a program (parallel enough for a decode step)
        per_program = math.gcd(per_row, ROPE_HEADS_PER_PROGRAM)
        _rope_kernel[(triton.cdiv(n, block_n), heads // per_program)](
            x3, positions.reshape(-1).contiguous(), freqs, out, n, heads, per_row, x3.stride(0), x3.stride(1),
            freqs.stride(0), HALF=r // 2, HALF_PAD=_pad(r // 2), BLOCK_N=block_n,
            HEADS_PER_PROGRAM=per_program)
    return out.view(x.shape)


def tier_qkv(q: Tensor, k: Tensor, v: Tensor, q_tier: Tensor, k_tier: Tensor, v_tier: Tensor, positions: Tensor,
             inv_freq: Tensor, tier_inv_freq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of `tier_qkv_ref` (same arguments) -> new q_full, k_full, v_full. Tiles of ROPE_BLOCK_N
    tokens per KV head, as `rope`'s."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_rope(q, positions, inv_freq)
    _check_rope(q_tier, positions, tier_inv_freq)
    heads, kv, r, tier_r = q.shape[-2], k.shape[-2], q.shape[-1], q_tier.shape[-1]
    if any(f.shape[0] not in (1, kv) for f in (inv_freq, tier_inv_freq)):
        raise ValueError(f"a tier layer's frequencies need 1 or {kv} rows, got {tuple(inv_freq.shape)} and "
                         f"{tuple(tier_inv_freq.shape)}")
    lead, n = positions.shape, positions.numel()
    rows = [_rows3(x, n) for x in (q, k, v, q_tier, k_tier, v_tier)]
    rv, vt = v.shape[-1], v_tier.shape[-1]
    outs = [torch.empty(n, h, w, dtype=x.dtype, device=x.device)
            for h, w, x in ((heads, r + tier_r, q), (kv, r + tier_r, k), (kv, rv + vt, v))]
    if n:
        freqs, tier_freqs = _freq_rows(inv_freq), _freq_rows(tier_inv_freq)
        block_n = 64 if interpreting() else ROPE_BLOCK_N  # the interpreter pays per program
        _tier_qkv_kernel[(triton.cdiv(n, block_n), kv)](
            *rows, positions.reshape(-1).contiguous(), freqs, tier_freqs, *outs, n,
            *(s for x in rows for s in x.stride()[:2]),
            _freq_stride(freqs), _freq_stride(tier_freqs),
            HEADS=heads, KV=kv, HC=r // 2, HC_PAD=_pad(r // 2), HT=tier_r // 2, HT_PAD=_pad(tier_r // 2), RV=rv,
            RV_PAD=_pad(rv), VT=vt, VT_PAD=_pad(vt), BLOCK_T=block_n)
    return tuple(o.view(*lead, *o.shape[1:]) for o in outs)
