"""Causal flash attention for a ragged batch whose K/V live in the paged cache.

Serves prefill (with or without a cached prefix) and mixed prefill + decode steps: sequence b
has q_len[b] new queries at the end of its seq_lens[b]-token context, and the new tokens' K/V
are already in the cache. The reference is `kernels.paged_attention.paged_attention_ref`.

Grid: (KV head x head chunk, query tile, sequence). A program's BLOCK_M rows are TOK tokens x
GH query heads of one KV head's group (GQA), so every K/V tile it gathers through the block
table serves the whole group at once and the dots are BLOCK_M tall even for short tiles. Keys
before the tile's first query position are visible to every row: those tiles run with no mask
at all; only the one or two tiles on the causal diagonal are masked. Heavy (late) query tiles
are launched first so the ragged tail of the grid is made of light ones. Tile sizes, warps and
pipeline depth are autotuned (kernels/tuning.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeroc_kernels.paged_attention import check_int8_args, index_rows, rows_contiguous, scale_pools
from zeroc_kernels.tiles import load_rows, paged_walk_start
from zeroc_kernels.tuning import autotuned, bucket, chosen, interpreting, launch

try:  # optional on CPU-only machines
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

LOG2E = 1.4426950408889634
MAX_GROUP_ROWS = 16  # query heads per program at most: wider groups are split into chunks

# (BLOCK_M rows = tokens x heads, BLOCK_N keys per tile, warps, pipeline stages).
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
] if triton is not None else []


if triton is not None:

    @triton.jit
    def _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, table, k_base, v_base, ks_ptr, vs_ptr, kv_head,
                     qk_scale, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb, stride_ss, stride_sh,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DQ: tl.constexpr, DQ_PAD: tl.constexpr,
                     DV: tl.constexpr, DV_PAD: tl.constexpr, INT8: tl.constexpr, PRECISION: tl.constexpr,
                     MASKED: tl.constexpr):
        # One BLOCK_N tile of keys [start, start + BLOCK_N) into the online softmax of the tile's rows.
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        if MASKED:
            page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            page = tl.load(table + pos // BLOCK_SIZE).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = load_rows(k_base, page * stride_kb + slot * stride_ks, tl.arange(0, DQ_PAD), DQ, DQ_PAD, valid, MASKED)
        v = load_rows(v_base, page * stride_vb + slot * stride_vs, tl.arange(0, DV_PAD), DV, DV_PAD, valid, MASKED)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), out_dtype=tl.float32, input_precision=PRECISION)  # [M, N]
        if INT8:  # codes through the dot, each token's scale on its score column
            srow = page * stride_sb + slot * stride_ss + kv_head * stride_sh
            s = s * tl.load(ks_ptr + srow, mask=valid, other=0.0)[None, :]
        s = s * qk_scale  # log2 units
        if MASKED:
            s = tl.where((pos[None, :] <= q_pos[:, None]) & valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if INT8:  # V's per-token scale moves onto the probabilities
            p = p * tl.load(vs_ptr + srow, mask=valid, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), out_dtype=tl.float32,
                                            input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, starts_ptr, out_ptr, qk_scale, q_bucket,
        stride_qn, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_sb, stride_ss, stride_sh,
        stride_tb, stride_on, stride_oh,
        GROUP: tl.constexpr, GH: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        DQ: tl.constexpr, DQ_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        DOT_F32: tl.constexpr, INT8: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        TOK = BLOCK_M // GH  # query tokens per tile (a constexpr)
        kv_head = tl.program_id(0) // CHUNKS
        chunk = tl.program_id(0) % CHUNKS
        tile = tl.num_programs(1) - 1 - tl.program_id(1)  # late (heavy) tiles first
        seq = tl.program_id(2)
        q_start = tl.load(starts_ptr + seq).to(tl.int32)  # int32 or int64 indices: int32 index math
        q_len = tl.load(starts_ptr + seq + 1).to(tl.int32) - q_start
        if tile * TOK >= q_len:
            return
        seq_len = tl.load(lens_ptr + seq).to(tl.int32)
        prefix = seq_len - q_len
        r = tl.arange(0, BLOCK_M)
        tok = tile * TOK + r // GH  # query index within the sequence
        hg = chunk * GH + r % GH  # query head within the group
        row_ok = (r < TOK * GH) & (tok < q_len) & (hg < GROUP)
        q_pos = prefix + tok  # absolute position of each row's query
        dq = tl.arange(0, DQ_PAD)
        dv = tl.arange(0, DV_PAD)
        q_rows = (q_start + tok).to(tl.int64) * stride_qn + (kv_head * GROUP + hg) * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + dq[None, :], mask=row_ok[:, None] & (dq[None, :] < DQ), other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i, l_i, acc, table, k_base, v_base = paged_walk_start(tables_ptr, seq, stride_tb, k_ptr, v_ptr, kv_head,
                                                                stride_kh, stride_vh, BLOCK_M, DV_PAD)
        kv_end = tl.minimum(seq_len, prefix + (tile + 1) * TOK)  # causal frontier of the tile's last query
        full_end = ((prefix + tile * TOK) // BLOCK_N) * BLOCK_N  # keys every row of the tile sees
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, table, k_base, v_base, ks_ptr,
                                         vs_ptr, kv_head, qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         stride_sb, stride_ss, stride_sh, BLOCK_SIZE, BLOCK_N, DQ, DQ_PAD, DV, DV_PAD,
                                         INT8, PRECISION, False)
        for start in range(full_end, kv_end, BLOCK_N):  # the diagonal: masked
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, table, k_base, v_base, ks_ptr,
                                         vs_ptr, kv_head, qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                         stride_sb, stride_ss, stride_sh, BLOCK_SIZE, BLOCK_N, DQ, DQ_PAD, DV, DV_PAD,
                                         INT8, PRECISION, True)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_rows = (q_start + tok).to(tl.int64) * stride_on + (kv_head * GROUP + hg) * stride_oh
        tl.store(out_ptr + o_rows[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))

    _paged_prefill_tuned = autotuned(_paged_prefill_kernel, PREFILL_CONFIGS,
                                     key=["GH", "BLOCK_SIZE", "DQ", "DV", "INT8", "q_bucket"])


def autotuned_config() -> dict | None:
    """The tile config of the last autotuned launch (benchmark reports)."""
    return chosen(_paged_prefill_tuned, PREFILL_CONFIGS) if triton is not None else None


def paged_prefill_attention(
    q: Tensor,  # [N, heads, dq] new queries, concatenated over sequences
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] context length, new tokens included
    query_start_loc: Tensor,  # [B + 1]
    scale: float,
    out: Tensor | None = None,  # optional [N, heads, dv] buffer, last dim dense
    block_m: int | None = None,
    block_n: int | None = None,
    k_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32 when the caches are int8
    v_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32
    config=None,
    max_q: int | None = None,  # the most new tokens of one sequence, when the caller knows it (saves a sync)
) -> Tensor:
    """Triton version of `paged_attention_ref` -> [N, heads, dv]; with int8 caches and their scales,
    of `paged_attention_int8_ref` (codes go through the dots, the per-token scales multiply scores
    and probabilities). config: one of PREFILL_CONFIGS instead of the autotuned choice; block_m and
    block_n (both or neither) pick tiles with 4 warps and 2 stages."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if (block_m is None) != (block_n is None):
        raise ValueError("block_m and block_n are given together")
    if block_m is not None:
        config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=2)
    int8 = check_int8_args(k_cache, v_cache, k_scales, v_scales)
    n, heads, dq = q.shape
    _, block_size, kv_heads, dv = v_cache.shape
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of the cache's KV heads ({kv_heads})")
    q, k_cache, v_cache = q.contiguous(), rows_contiguous(k_cache), rows_contiguous(v_cache)
    tables, lens, starts = index_rows(block_tables), index_rows(seq_lens), index_rows(query_start_loc)
    if out is not None and out.stride(-1) != 1:  # the kernel writes dense rows: go through a buffer
        return out.copy_(paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                 scale, k_scales=k_scales, v_scales=v_scales, config=config,
                                                 max_q=max_q))
    if out is None:
        out = torch.empty(n, heads, dv, dtype=q.dtype, device=q.device)
    if max_q is None:
        max_q = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    group = heads // kv_heads
    gh = min(group, MAX_GROUP_ROWS)
    chunks = -(-group // gh)
    k_scales, v_scales, s_strides = scale_pools(k_scales, v_scales, q)
    args = (q, k_cache, v_cache, k_scales, v_scales, tables, lens, starts, out, scale * LOG2E,
            bucket(max_q, 16, 16384),
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *s_strides,
            tables.stride(0), out.stride(0), out.stride(1))
    meta = dict(GROUP=group, GH=gh, CHUNKS=chunks, BLOCK_SIZE=block_size,
                DQ=dq, DQ_PAD=max(16, triton.next_power_of_2(dq)), DV=dv, DV_PAD=max(16, triton.next_power_of_2(dv)),
                # Triton's CPU interpreter computes bf16/fp16 tl.dot wrongly (seen with triton 3.9): there,
                # upcast the operands; on a GPU half-precision dots run on the tensor cores.
                DOT_F32=interpreting(), INT8=int8, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    def grid(meta_args):
        return (kv_heads * chunks, triton.cdiv(max_q, meta_args["BLOCK_M"] // gh), tables.shape[0])

    launch(_paged_prefill_kernel, _paged_prefill_tuned, grid, args, meta, PREFILL_CONFIGS, config)
    return out
