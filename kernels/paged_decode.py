"""Decode attention over the paged (compressed) KV cache: one new query per sequence.

`paged_decode_attention` is the Triton kernel (GPU; runs on the CPU under TRITON_INTERPRET=1
for tests), `paged_decode_attention_ref` its PyTorch reference. K and V may have different
widths (ZeroC keeps fewer Q/K and V dims per layer).

Decode is bound by reading the KV cache once, so the kernel is built for bandwidth:
- one program per (sequence, KV head, split) serves every query head of that KV head's group
  (GQA), so each K/V byte is read once; the group is padded to 16 rows, the `tl.dot` minimum;
- each loop iteration gathers BLOCK_N tokens (64-256) spanning several pages: a vector of
  block-table entries, then per-token row addresses, so the loads are wide and many are in
  flight, and `num_stages` software-pipelines the next tiles' loads under this tile's math;
- scores and P @ V on the tensor cores (`tl.dot`, fp32 accumulate), online softmax in base 2;
- int8 caches: codes go through the dot, the per-token scales multiply the scores (K) and the
  probabilities (V), so nothing is dequantised in memory;
- split-K (flash-decoding) when (sequences x KV heads) would leave SMs idle, merged by LSE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zeroc_kernels.paged_attention import (check_int8_args, index_rows, paged_attention_int8_ref, paged_attention_ref,
                                           rows_contiguous, scale_pools)
from zeroc_kernels.tiles import load_rows, paged_walk_start
from zeroc_kernels.tuning import autotuned, bucket, chosen, interpreting, launch

try:  # Triton is optional on CPU-only machines; the reference serves there.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def paged_decode_attention_ref(
    q: Tensor,  # [B, heads, dq] one query per sequence
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] context length, the new token included
    scale: float,
) -> Tensor:
    """-> [B, heads, dv]"""
    starts = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, starts, scale)


def decode_partials_ref(
    q: Tensor,  # [B, heads, dq] one query per sequence
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B] keys end here
    scale: float,
    key_start: int = 0,  # keys start here, for every sequence
) -> tuple[Tensor, Tensor]:
    """Each query over its sequence's keys [key_start, seq_len) -> (out [B, heads, 1, dv], lse [B, heads, 1]):
    one partial, as `decode_partials` gives them, to be merged by `merge_partials_ref` with attention over
    other keys. A sequence with no key gets out 0 and lse -inf."""
    b, heads, _ = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    ctx = block_tables.shape[1] * block_size
    k_pos = torch.arange(ctx, device=q.device)
    live = (k_pos[None] >= key_start) & (k_pos[None] < seq_lens[:, None])  # [B, ctx]
    k = k_cache[block_tables].reshape(b, ctx, kv_heads, -1).float()  # [B, ctx, kv, dq]
    v = torch.where(live[..., None, None], v_cache[block_tables].reshape(b, ctx, kv_heads, -1).float(), 0.0)
    qg = q.float().view(b, kv_heads, heads // kv_heads, -1)  # [B, kv, group, dq]
    scores = torch.einsum("bgjd,bkgd->bgjk", qg, k) * scale  # [B, kv, group, ctx]
    scores = scores.masked_fill(~live[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [B, kv, group]
    probs = torch.exp(scores - lse.masked_fill(lse.isinf(), 0.0)[..., None])  # no key: all 0
    out = torch.einsum("bgjk,bkgd->bgjd", probs, v).reshape(b, heads, 1, -1)
    return out.to(q.dtype), lse.reshape(b, heads, 1)


def paged_decode_attention_int8_ref(
    q: Tensor,  # [B, heads, dq]
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq] int8
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv] int8
    k_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    v_scales: Tensor,  # [num_blocks, block_size, kv_heads] fp32
    block_tables: Tensor,  # [B, max_blocks]
    seq_lens: Tensor,  # [B]
    scale: float,
) -> Tensor:
    """-> [B, heads, dv]: one query per sequence through `paged_attention_int8_ref`."""
    starts = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_int8_ref(q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens, starts, scale)


LOG2E = 1.4426950408889634

# (BLOCK_N tokens per iteration, warps, pipeline stages). Shared memory per stage is
# BLOCK_N x (dq + dv) x 2 bytes in bf16 (64 KB at 128 tokens x 128 + 128): the 256-token tile
# gets at most 2 stages, smaller tiles deeper pipelines. The autotuner drops configs that do not fit.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=1),
] if triton is not None else []


if triton is not None:

    @triton.jit
    def _int8_rows_by_words(base, rows, valid, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        # int8 rows [N, D_PAD] (zero past D and on rows not valid) read as int32 words, each split into its four
        # codes in registers. Read as bytes, V's tile reaches P @ V's operand layout through one-byte shared
        # memory loads (sm_90: 128 a thread per tile, 255 registers and a spill); as words, through 16-byte
        # copies (tests/kernels/test_sm90_compile.py). rows: element offsets, multiples of 4 (the host checks).
        w = tl.arange(0, D_PAD // 4)
        words = tl.load(base.to(tl.pointer_type(tl.int32), bitcast=True) + (rows // 4)[:, None] + w[None, :],
                        mask=valid[:, None] & (w[None, :] < D // 4), other=0)  # [N, D_PAD / 4]
        b0, b1 = (words << 24) >> 24, (words << 16) >> 24  # arithmetic shifts: each code sign-extended
        b2, b3 = (words << 8) >> 24, words >> 24
        # join adds a last axis: [N, W, 2, 2] indexed [w, a, b] holds byte 2a + b; reshaped, byte j of word w lands
        # at column 4w + j
        return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_N, D_PAD))

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, qk_scale, key_start,
        len_bucket, grid_bucket,  # size classes for the autotuning key only
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_sb, stride_ss, stride_sh,
        stride_tb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        DQ: tl.constexpr, DQ_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, INT8: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, PV_T: tl.constexpr, V_WORDS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Program (seq, kv_head, split): the split-th of num_splits pieces, whole pages long, of the sequence's own
        # keys [key_start, length) (a CUDA graph's tables are wider than the contexts), a partial output plus its
        # natural-log LSE. key_start is 0 but for a token tier's compressed segment, which skips the sinks.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GROUP_PAD)
        dq = tl.arange(0, DQ_PAD)
        dv = tl.arange(0, DV_PAD)
        heads = kv_head * GROUP + g
        g_ok = g < GROUP
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dq[None, :],
                    mask=g_ok[:, None] & (dq[None, :] < DQ), other=0.0)  # [G, DQ]
        if DOT_F32:
            q = q.to(tl.float32)
        seq_len = tl.load(lens_ptr + seq).to(tl.int32)  # int32 or int64 lengths: int32 index math
        split_len = tl.cdiv(tl.cdiv(seq_len - key_start, tl.num_programs(2)), BLOCK_SIZE) * BLOCK_SIZE
        first = key_start + split * split_len
        end = tl.minimum(seq_len, first + split_len)
        m_i, l_i, acc, table, k_base, v_base = paged_walk_start(tables_ptr, seq, stride_tb, k_ptr, v_ptr, kv_head,
                                                                stride_kh, stride_vh, GROUP_PAD, DV_PAD)
        for start in range(first, end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < end
            # BLOCK_N tokens over several pages: their pages' ids, then each token's row.
            page = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            k = load_rows(k_base, page * stride_kb + slot * stride_ks, dq, DQ, DQ_PAD, valid, True)  # [N, DQ]
            if V_WORDS:  # int8 codes, 4 to a word
                v = _int8_rows_by_words(v_base, page * stride_vb + slot * stride_vs, valid, DV, DV_PAD, BLOCK_N)
            else:
                v = load_rows(v_base, page * stride_vb + slot * stride_vs, dv, DV, DV_PAD, valid, True)  # [N, DV]
            s = tl.dot(q, tl.trans(k.to(q.dtype)), out_dtype=tl.float32, input_precision=PRECISION)  # [G, N]
            if INT8:  # int8 codes through the dot; each token's fp32 scale on its score column
                srow = page * stride_sb + slot * stride_ss + kv_head * stride_sh
                s = s * tl.load(ks_ptr + srow, mask=valid, other=0.0)[None, :]
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # log2 units
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if INT8:  # V's scale moves onto the probabilities: P diag(s_v) V_codes
                p = p * tl.load(vs_ptr + srow, mask=valid, other=0.0)[None, :]
            if PV_T:  # (V^T P^T)^T: see `decode_partials`
                acc = acc * alpha[:, None] + tl.trans(tl.dot(tl.trans(v.to(q.dtype)), tl.trans(p.to(q.dtype)),
                                                             out_dtype=tl.float32, input_precision=PRECISION))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), out_dtype=tl.float32,
                                                    input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0  # a split past the sequence's end
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (dv[None, :] < DV))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_ok)

    _paged_decode_tuned = autotuned(_paged_decode_kernel, DECODE_CONFIGS,
                                    key=["GROUP_PAD", "BLOCK_SIZE", "DQ", "DV", "INT8", "PV_T", "V_WORDS",
                                         "len_bucket", "grid_bucket"])

    @triton.jit
    def _merge_kernel(
        outs_ptr, lses_ptr, out_ptr, lse_ptr,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_fb,
        S: tl.constexpr, S_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        dv = tl.arange(0, DV_PAD)
        lse = tl.load(lses_ptr + b * stride_lb + h * stride_lh + s, mask=s < S, other=float("-inf"))  # [S]
        parts = tl.load(outs_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + dv[None, :],
                        mask=(s[:, None] < S) & (dv[None, :] < DV), other=0.0).to(tl.float32)  # [S, DV]
        m = tl.max(lse, axis=0)
        w = tl.exp(lse - m)
        total = tl.sum(w, axis=0)
        out = tl.sum(w[:, None] * parts, axis=0) / total
        tl.store(out_ptr + b * stride_ob + h * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)
        tl.store(lse_ptr + b * stride_fb + h, m + tl.log(total))


def merge_partials_ref(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over disjoint key sets. outs: [B, H, S, dv], lses: [B, H, S] -> ([B, H, dv], [B, H])

    Used for split-K decoding and for the two-segment (full-rank tier + compressed tier) merge.
    """
    lse = torch.logsumexp(lses.float(), dim=-1)  # [B, H]
    weights = torch.exp(lses.float() - lse[..., None])  # [B, H, S]
    return (weights[..., None] * outs.float()).sum(-2).to(outs.dtype), lse


def merge_partials(outs: Tensor, lses: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Triton version of `merge_partials_ref` (same shapes); `out`: optional [B, H, dv] destination
    (last dim dense), written in its own dtype."""
    b, h, s, dv = outs.shape
    outs, lses = outs.contiguous(), lses.float().contiguous()
    if out is None:
        out = torch.empty(b, h, dv, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(b, h, dtype=torch.float32, device=outs.device)
    _merge_kernel[(b, h)](
        outs, lses, out, lse,
        outs.stride(0), outs.stride(1), outs.stride(2), lses.stride(0), lses.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        S=s, S_PAD=max(2, triton.next_power_of_2(s)), DV=dv, DV_PAD=triton.next_power_of_2(dv),
    )
    return out, lse


# Split-K heuristic. A program's cost is its tokens plus a fixed part (loading q, writing a
# partial, its share of the merge), counted in tokens; programs run in waves of
# PROGRAMS_PER_SM x SMs. The split count minimising waves x per-program cost wins, smallest on a
# tie, never cutting a split below MIN_SPLIT_TOKENS. PROGRAMS_PER_SM is fitted to the split sweeps of
# benchmarks/gpu_kernels.py on an H200 (132 SMs, 2026-12-04, docs/benchmarks.md): batch 64 x 8 KV heads ran
# fastest at 2 splits (1,024 programs; 1 split took 6% longer), batch 8 at 16 and batch 1 at 16-32. At 2
# programs per SM the model picked 1, 4 and 32; at 8 it picks 2, 16 and 32. A memory-bound kernel wants
# more programs in flight than fit at once, so the next one's loads start while the last one's drain.
MIN_SPLIT_TOKENS = 256
SPLIT_OVERHEAD_TOKENS = 128
PROGRAMS_PER_SM = 8
MAX_SPLITS = 32


def choose_num_splits(num_seqs: int, kv_heads: int, max_blocks: int, num_sms: int, block_size: int = 16) -> int:
    """How many context splits per (sequence, KV head) for a decode step whose longest table
    holds `max_blocks` pages of `block_size` tokens, on `num_sms` SMs (0: no GPU, 1 split)."""
    context = max_blocks * block_size
    programs = max(1, num_seqs * kv_heads)
    slots = max(1, num_sms * PROGRAMS_PER_SM)
    most = max(1, min(MAX_SPLITS, context // MIN_SPLIT_TOKENS))
    best, best_cost = 1, math.inf
    for splits in range(1, most + 1):
        waves = -(-programs * splits // slots)
        cost = waves * (-(-context // splits) + SPLIT_OVERHEAD_TOKENS)
        if cost < best_cost:
            best, best_cost = splits, cost
    return best


def autotuned_config() -> dict | None:
    """The tile config of the last autotuned launch (benchmark reports)."""
    return chosen(_paged_decode_tuned, DECODE_CONFIGS) if triton is not None else None


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float, out: Tensor | None = None,
                           num_splits: int | None = None, k_scales: Tensor | None = None,
                           v_scales: Tensor | None = None, config=None, pv_transposed: bool = False,
                           v_words: bool = True) -> Tensor:
    """Triton version of `paged_decode_attention_ref` (same arguments and shapes).

    out: optional [B, heads, dv] buffer (tests poison it to catch unwritten rows).
    k_scales, v_scales: [num_blocks, block_size, kv_heads] fp32 when the caches are int8 as written
    by `kernels.kv_quant.quantize_into_slots` (reference: `paged_decode_attention_int8_ref`).
    num_splits > 1 splits each sequence's context across programs (flash-decoding), merged by
    log-sum-exp; None picks it with `choose_num_splits` from the device's SM count (1 off CUDA).
    config: one of DECODE_CONFIGS to run instead of the autotuned choice.
    pv_transposed: P @ V as (V^T P^T)^T (an experiment, off by default; see `decode_partials`).
    v_words: int8 V codes read as int32 words where the pool allows (the default; see `decode_partials`).
    """
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        num_splits = choose_num_splits(q.shape[0], v_cache.shape[2], block_tables.shape[1], sms, v_cache.shape[1])
    direct = num_splits == 1 and out is not None and out.stride(-1) == 1
    # one split writes its result straight into the caller's buffer
    partial, lses = decode_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, k_scales,
                                    v_scales, config, out.unsqueeze(2) if direct else None,
                                    pv_transposed=pv_transposed, v_words=v_words)
    if direct:
        return out
    if num_splits == 1:
        result = partial[:, :, 0]
    else:
        result = merge_partials(partial, lses, out if out is not None and out.stride(-1) == 1 else None)[0]
        if result is out:
            return out
        result = result.to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def _word_rows(cache: Tensor) -> bool:
    """Whether an int8 pool's rows start on 4-byte boundaries and hold whole int32 words."""
    return cache.data_ptr() % 4 == 0 and all(x % 4 == 0 for x in (*cache.stride()[:3], cache.shape[-1]))


def decode_partials(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    scale: float, num_splits: int, k_scales: Tensor | None = None, v_scales: Tensor | None = None,
                    config=None, partial: Tensor | None = None, key_start: int = 0,
                    pv_transposed: bool = False, v_words: bool = True) -> tuple[Tensor, Tensor]:
    """The decode kernel's launch, before the merge (arguments as `paged_decode_attention`'s)
    -> (partial [B, heads, num_splits, dv]: each split's output, fp32 unless one split; lses [B, heads,
    num_splits]: each split's natural-log LSE, -inf where the split held no token). partial: a destination.
    key_start: attend keys [key_start, seq_lens) only (`decode_partials_ref`); a sequence with none gets
    outputs 0 and LSE -inf.

    pv_transposed: the tile's P @ V as (V^T P^T)^T, an experiment kept for benchmarks/gpu_kernels.py: V^T is
    then wgmma's register operand, its int8 codes loaded 16 bytes at a time (tests/kernels/test_sm90_compile.py).
    Timed on an H100 (2026-12-05, docs/benchmarks.md) the plain form was faster all the same: int8 rank 64
    0.310 ms against 0.406, full-width int8 0.546 against 0.554; bf16 transposed 0.749 against 0.771, within
    noise. So the default is the plain form everywhere.

    v_words: int8 V codes are read as int32 words where their rows allow it (`_int8_rows_by_words`); False
    reads them as bytes, the form the H100 timed (one-byte shared-memory loads on sm_90), kept as an experiment
    row of benchmarks/gpu_kernels.py until a GPU has timed both."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_seqs, heads, dq = q.shape
    _, block_size, kv_heads, dv = v_cache.shape
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if key_start < 0:
        raise ValueError(f"key_start must be >= 0, got {key_start}")
    if heads % kv_heads:
        raise ValueError(f"q heads ({heads}) must be a multiple of the cache's KV heads ({kv_heads})")
    int8 = check_int8_args(k_cache, v_cache, k_scales, v_scales)
    # q through its row and head strides too: a token tier's compressed dims are a column slice of its full-rank q
    q, k_cache, v_cache = rows_contiguous(q), rows_contiguous(k_cache), rows_contiguous(v_cache)
    k_scales, v_scales, s_strides = scale_pools(k_scales, v_scales, q)
    tables, lens = index_rows(block_tables), index_rows(seq_lens)
    if partial is None:
        partial = torch.empty(num_seqs, heads, num_splits, dv,
                              dtype=torch.float32 if num_splits > 1 else q.dtype, device=q.device)
    lses = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=q.device)
    split_len = -(-block_tables.shape[1] // num_splits) * block_size  # the most a split holds: a key class
    args = (q, k_cache, v_cache, k_scales, v_scales, tables, lens, partial, lses, scale * LOG2E, key_start,
            bucket(split_len, 256, 16384), bucket(num_seqs * kv_heads * num_splits, 128, 8192),
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *s_strides,
            tables.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), lses.stride(0), lses.stride(1))
    group = heads // kv_heads
    meta = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
                DQ=dq, DQ_PAD=max(16, triton.next_power_of_2(dq)), DV=dv, DV_PAD=max(16, triton.next_power_of_2(dv)),
                INT8=int8,
                # Triton's CPU interpreter computes bf16/fp16 tl.dot wrongly (seen with triton 3.9): there,
                # upcast the operands; on a GPU half-precision dots run on the tensor cores.
                DOT_F32=interpreting(), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                PV_T=bool(pv_transposed), V_WORDS=v_words and int8 and _word_rows(v_cache))
    launch(_paged_decode_kernel, _paged_decode_tuned, (num_seqs, kv_heads, num_splits), args, meta,
           DECODE_CONFIGS, config)
    return partial, lses
