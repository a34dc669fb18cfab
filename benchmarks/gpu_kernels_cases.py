"""Builders and checks for benchmarks/gpu_kernels.py: paged pools, correctness against the references,
the attention block, the model's fused path."""

from __future__ import annotations

import math

import torch

from zeroc_kernels.attention import TritonBackend
from zeroc_kernels.paged_attention import paged_attention_int8_ref, paged_attention_ref
from zeroc_kernels.paged_decode import (DECODE_CONFIGS, paged_decode_attention, paged_decode_attention_int8_ref,
                                        paged_decode_attention_ref)
from zeroc_kernels.paged_prefill import PREFILL_CONFIGS, paged_prefill_attention
from zeroc_kernels.qkv_epilogue import qkv_epilogue, qkv_epilogue_ref, qkv_rotate_epilogue, qkv_rotate_epilogue_ref
from zeroc_kernels.tuning import config_id


def paged_kv(batch: int, ctx: int, kv_heads: int, dq: int, dv: int, block_size: int, dtype, device):
    """Every sequence `ctx` tokens over randomly placed pages of one pool -> k_cache, v_cache, tables, lens."""
    blocks = -(-ctx // block_size)
    k = torch.randn(batch * blocks, block_size, kv_heads, dq, dtype=dtype, device=device)
    v = torch.randn(batch * blocks, block_size, kv_heads, dv, dtype=dtype, device=device)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks)
    return k, v, tables, torch.full((batch,), ctx, device=device)


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _decode_errors(device, dtype, dim: int, ctx: int) -> dict:
    k, v, tables, lens = paged_kv(3, ctx, 2, dim, dim, 16, dtype, device)
    lens = torch.tensor([ctx, ctx // 2 + 1, 1], device=device)
    q = torch.randn(3, 8, dim, dtype=dtype, device=device)
    ref = paged_decode_attention_ref(q.float(), k.float(), v.float(), tables, lens, 0.125)
    errors = {f"decode_splits{s}": _err(paged_decode_attention(q, k, v, tables, lens, 0.125, num_splits=s), ref)
              for s in (1, 4)}
    for config in DECODE_CONFIGS:
        errors[f"decode_{config_id(config)}"] = max(
            _err(paged_decode_attention(q, k, v, tables, lens, 0.125, num_splits=s, config=config), ref)
            for s in (1, 3))
    kq, vq = (torch.randint(-127, 128, k.shape, dtype=torch.int8, device=device) for _ in range(2))
    ks, vs = (torch.rand(k.shape[:3], device=device) / 127 for _ in range(2))
    ref = paged_decode_attention_int8_ref(q, kq, vq, ks, vs, tables, lens, 0.125)
    errors["decode_int8"] = _err(paged_decode_attention(q, kq, vq, tables, lens, 0.125, k_scales=ks, v_scales=vs), ref)
    return errors


def _prefill_errors(device, dtype, dim: int, ctx: int) -> dict:
    k, v, tables, lens = paged_kv(3, ctx, 2, dim, dim, 16, dtype, device)
    fresh = ctx // 2 + 1
    lens = torch.tensor([ctx, fresh, 40], device=device)
    # 2/3 of the context new after a cached third, a fresh prompt, one decode row
    new = 2 * ctx // 3
    starts = torch.tensor([0, new, new + fresh, new + fresh + 1], device=device)
    q = torch.randn(new + fresh + 1, 8, dim, dtype=dtype, device=device)
    ref = paged_attention_ref(q.float(), k.float(), v.float(), tables, lens, starts, 0.125)
    errors = {"prefill": _err(paged_prefill_attention(q, k, v, tables, lens, starts, 0.125), ref)}
    for config in PREFILL_CONFIGS:
        errors[f"prefill_{config_id(config)}"] = _err(
            paged_prefill_attention(q, k, v, tables, lens, starts, 0.125, config=config), ref)
    kq, vq = (torch.randint(-127, 128, k.shape, dtype=torch.int8, device=device) for _ in range(2))
    ks, vs = (torch.rand(k.shape[:3], device=device) / 127 for _ in range(2))
    ref = paged_attention_int8_ref(q, kq, vq, ks, vs, tables, lens, starts, 0.125)
    errors["prefill_int8"] = _err(paged_prefill_attention(q, kq, vq, tables, lens, starts, 0.125, k_scales=ks,
                                                          v_scales=vs), ref)
    # the fresh path: two prompts with no prefix, attended from their own rows (read back from the pages)
    lens, starts = torch.tensor([ctx, fresh], device=device), torch.tensor([0, ctx, ctx + fresh], device=device)
    q = torch.randn(ctx + fresh, 8, dim, dtype=dtype, device=device)
    ref = paged_attention_ref(q.float(), k.float(), v.float(), tables[:2], lens, starts, 0.125)
    pos = torch.cat([torch.arange(ctx, device=device), torch.arange(fresh, device=device)])
    seq = torch.cat([torch.zeros(ctx, dtype=torch.long, device=device), torch.ones(fresh, dtype=torch.long,
                                                                                   device=device)])
    rows = tables[seq, pos // 16], pos % 16
    errors["prefill_fresh_path"] = _err(TritonBackend().fresh_prefill(q, k[rows], v[rows], (ctx, fresh), 0.125), ref)
    return errors


def _epilogue_errors(device, dtype, dim: int) -> dict:
    gen_kw = dict(dtype=dtype, device=device)
    n, r = (90, 32) if dim >= 128 else (20, 16)
    args = (torch.randn(n, 8, r, **gen_kw), torch.randn(n, 2, r, **gen_kw), torch.randn(n, 2, 48, **gen_kw),
            torch.randint(0, 8192, (n,), device=device), torch.rand(2, r // 2, device=device),
            torch.randperm(128, device=device)[:n])
    pools = [(torch.zeros(8, 16, 2, r, **gen_kw), torch.zeros(8, 16, 2, 48, **gen_kw)) for _ in range(2)]
    errors = {"qkv_epilogue": _err(qkv_epilogue(*args, *pools[0]), qkv_epilogue_ref(*args, *pools[1]))}
    d = dim  # rotate mode: full-width q/k in, rank-r out through each KV head's bases
    rot = (torch.randn(n, 8, d, **gen_kw), torch.randn(n, 2, d, **gen_kw), args[2], args[3],
           torch.rand(1, d // 2, device=device), torch.randn(2, d, r, **gen_kw) / 8, torch.randn(2, d, r, **gen_kw) / 8,
           args[5])
    errors["qkv_rotate_epilogue"] = _err(qkv_rotate_epilogue(*rot, *pools[0]), qkv_rotate_epilogue_ref(*rot, *pools[1]))
    errors["qkv_rotate_epilogue_k_pool"] = _err(pools[0][0], pools[1][0])
    return errors


def _per_head_errors(device, dtype) -> dict:
    """Each run of equal-rank heads read in place through a column view of the row pool."""
    from zeroc.head_ranks import HeadLayout

    layout = HeadLayout.of((16, 16, 48), (8, 8, 32), group=4)  # runs: 2 heads at (16, 8), 1 at (48, 32)
    k_row, v_row, tables, _ = paged_kv(3, 96, 1, 2 * 16 + 48, 2 * 8 + 32, 16, dtype, device)
    lens = torch.tensor([96, 50, 7], device=device)
    starts = torch.tensor([0, 40, 41, 48], device=device)
    errors = {}
    views = zip(layout.pool_views(k_row, [16, 48]), layout.pool_views(v_row, [8, 32]))
    for i, (run, (kc, vc)) in enumerate(zip(layout.runs, views)):
        qd = torch.randn(3, 4 * run.heads, kc.shape[-1], dtype=dtype, device=device)
        qp = torch.randn(48, 4 * run.heads, kc.shape[-1], dtype=dtype, device=device)
        ref = paged_decode_attention_ref(qd.float(), kc.float(), vc.float(), tables, lens, 0.125)
        # One config each: the autotuner would compile every config for these small widths.
        errors[f"decode_per_head_run{i}"] = _err(paged_decode_attention(qd, kc, vc, tables, lens, 0.125,
                                                                        config=DECODE_CONFIGS[3]), ref)
        ref = paged_attention_ref(qp.float(), kc.float(), vc.float(), tables, lens, starts, 0.125)
        errors[f"prefill_per_head_run{i}"] = _err(paged_prefill_attention(qp, kc, vc, tables, lens, starts, 0.125,
                                                                          config=PREFILL_CONFIGS[0]), ref)
    return errors


def correctness(device, dtype, dim: int = 128, ctx: int = 300) -> dict:
    """Max abs error of each kernel (every autotune config) against its reference on ragged cases of
    head width `dim` and contexts up to `ctx`."""
    return {**_decode_errors(device, dtype, dim, ctx), **_prefill_errors(device, dtype, dim, ctx),
            **_epilogue_errors(device, dtype, dim),
            **_per_head_errors(device, dtype), **_layer_op_errors(device, dtype),
            "tier_decode": _tier_error(device, dtype, dim), "tier_prefill": _tier_prefill_error(device, dtype, dim)}


def tier_case(batch: int, kv_heads: int, group: int, dim: int, rank: int, block_size: int, dtype, device,
              sinks: int = 4, recent: int = 64, parts: int = 2) -> tuple:
    """A token tier's decode step after its compressed segment, fold rank `rank` of `dim` (kernels/tier_decode.py):
    each sequence's S + W slots at random rows of a pool, its tier rows in blocks of its own, every key seen but
    one ring slot (the one its new token replaces) -> `tier_decode`'s arguments."""
    from zeroc_kernels.tier_decode import TierSlots

    held, width, row = sinks + recent, 2 * (dim - rank), 2 * rank
    n_tier = -(-held * kv_heads * width // (block_size * kv_heads * row))
    num_blocks = batch * (n_tier + 8)
    pool = torch.randn(num_blocks, block_size, kv_heads, row, dtype=dtype, device=device)
    tier_ids = torch.randperm(num_blocks, device=device)[: batch * n_tier].view(batch, n_tier)
    blocks = torch.randint(num_blocks, (batch, held), device=device)
    offsets = torch.randint(block_size, (batch, held), device=device)
    seen = torch.ones(batch, held + 1, dtype=torch.bool, device=device)
    seen[:, sinks] = False
    q = torch.randn(batch, kv_heads * group, dim, dtype=dtype, device=device)
    own = [torch.randn(batch, kv_heads, dim, dtype=dtype, device=device) for _ in range(2)]
    partials = torch.randn(batch, kv_heads * group, parts, rank, dtype=torch.float32, device=device)
    lses = torch.randn(batch, kv_heads * group, parts, device=device) * 3
    return q, pool, rank, TierSlots(blocks, offsets, tier_ids, seen), *own, partials, lses, 1 / math.sqrt(dim)


def _tier_error(device, dtype, dim: int) -> float:
    from zeroc_kernels.tier_decode import tier_decode, tier_decode_ref

    args = tier_case(5, 2, 4, dim, dim // 2, 16, dtype, device)
    return _err(tier_decode(*args), tier_decode_ref(*args))


def tier_prefill_case(tokens: int, kv_heads: int, group: int, dim: int, rank: int, dtype, device) -> tuple:
    """A token tier's prompt of `tokens` rows at fold rank `rank` of `dim`, as its pools get them: q, k, v with
    the tier's dims after the compressed ones, and the layer's widths (zeroc/tier.py `tiered_chunk_attention`)."""
    from zeroc.tier import TierLayer

    q = torch.randn(tokens, kv_heads * group, dim, dtype=dtype, device=device)
    k, v = (torch.randn(tokens, kv_heads, dim, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, TierLayer(rank, rank, dim - rank, dim - rank)


def _tier_prefill_error(device, dtype, dim: int, tokens: int = 300) -> float:
    """The prompt path by segments (the backend's flash kernel with its LSE, local attention) against the dense
    reference, 4 sinks and a 64-token window."""
    from zeroc.tier import tiered_chunk_attention, tiered_attention

    q, k, v, t = tier_prefill_case(tokens, 2, 4, dim, dim // 2, dtype, device)
    got = tiered_chunk_attention(q, k, v, t, 4, 64, 0.125, TritonBackend().dense_partials)
    comp = [x[None, ..., :w].float() for x, w in ((q, t.k_dim), (k, t.k_dim), (v, t.v_dim))]
    return _err(got, tiered_attention(*comp, q[None].float(), k[None].float(), v[None].float(), 4, 64, 0.125)[0])


def _layer_op_errors(device, dtype) -> dict:
    """The fused norm and gate against the references in the same dtype (equal up to a rounding or two)."""
    from zeroc_kernels.layer_ops import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref, silu_mul, silu_mul_ref

    x, w = torch.randn(37, 4096, dtype=dtype, device=device) * 3, torch.rand(4096, dtype=dtype, device=device)
    res = torch.randn(37, 4096, dtype=dtype, device=device) * 5
    gate, up = torch.randn(37, 1000, dtype=dtype, device=device) * 4, torch.randn(37, 1000, dtype=dtype, device=device)
    (normed, total), (normed_ref, total_ref) = add_rms_norm(x, res, w, 1e-5), add_rms_norm_ref(x, res, w, 1e-5)
    return {"rms_norm": _err(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)),
            "add_rms_norm": max(_err(normed, normed_ref), _err(total, total_ref)),
            "silu_mul": _err(silu_mul(gate, up), silu_mul_ref(gate, up))}


def per_head_pools(s: dict, dtype, device):
    """Half the KV heads at rank - rank/4, half at rank + rank/4, cached as one row per token.
    -> queries per run, (k view, v view) per run, tables, lens, KV bytes, the two widths"""
    from zeroc.head_ranks import HeadLayout

    half, r, group = s["kv_heads"] // 2, s["rank"], s["heads"] // s["kv_heads"]
    widths = [r - r // 4, r + r // 4]
    layout = HeadLayout.of((widths[0],) * half + (widths[1],) * half, (widths[0],) * half + (widths[1],) * half, group)
    k, v, tables, lens = paged_kv(s["decode_batch"], s["decode_ctx"], 1, 2 * half * r, 2 * half * r,
                                  s["block_size"], dtype, device)
    views = list(zip(layout.pool_views(k, widths), layout.pool_views(v, widths)))
    qs = [torch.randn(s["decode_batch"], half * group, w, dtype=dtype, device=device) for w in widths]
    return qs, views, tables, lens, 2 * k.numel() * k.element_size(), widths


def block_timings(s: dict, device, dtype, timed) -> list[dict]:
    """Attention block: QKV GEMM -> epilogue (RoPE [+ rotate bases] + cache write) -> attention -> O GEMM."""
    d, r = s["head_dim"], s["rank"]
    # (name, q/k GEMM width per head, q/k rank in the cache, v rank, rotate mode)
    methods = (("uncompressed", d, d, d, False), (f"zeroc fold rank {r}", r, r, r, False),
               (f"zeroc rotate rank {r}", d, r, r, True))
    rows = []
    for tokens in s["prefill"]:
        base = None
        for name, width, qk, vr, rotate in methods:
            heads, kv = s["heads"], s["kv_heads"]
            x = torch.randn(tokens, s["hidden"], dtype=dtype, device=device)
            w_qkv = torch.randn((heads + kv) * width + kv * vr, s["hidden"], dtype=dtype, device=device) * 0.02
            w_o = torch.randn(s["hidden"], heads * vr, dtype=dtype, device=device) * 0.02
            k_pool, _, tables, lens = paged_kv(1, tokens, kv, qk, vr, s["block_size"], dtype, device)
            v_pool = torch.zeros(*k_pool.shape[:3], vr, dtype=dtype, device=device)
            bases = [torch.randn(kv, d, qk, dtype=dtype, device=device) / math.sqrt(d) for _ in range(2)]
            inv_freq = torch.rand(1 if rotate else kv, width // 2, device=device)
            positions = torch.arange(tokens, device=device)
            slots = torch.arange(tokens, device=device)
            starts = torch.tensor([0, tokens], device=device)
            scale = 1 / math.sqrt(d)

            def block():
                qkv = x @ w_qkv.T  # [T, (heads + kv) * width + kv * vr]
                q, k, v = qkv.split([heads * width, kv * width, kv * vr], dim=-1)
                q, k, v = q.view(tokens, heads, width), k.view(tokens, kv, width), v.view(tokens, kv, vr)
                if rotate:
                    q = qkv_rotate_epilogue(q, k, v, positions, inv_freq, *bases, slots, k_pool, v_pool)
                else:
                    q = qkv_epilogue(q, k, v, positions, inv_freq, slots, k_pool, v_pool)
                out = paged_prefill_attention(q, k_pool, v_pool, tables, lens, starts, scale)
                return out.view(tokens, -1) @ w_o.T

            ms = timed(block)
            base = base or ms
            rows.append({"what": f"attention block {tokens}", "method": name, "ms": ms, "ratio": ms / base})
    return rows


def model_path_error(device, dtype) -> float:
    """Max abs difference between `Transformer.forward_paged` on the Triton backend (the fused epilogue, the
    CUDA path) and on the torch backend, on a small random GQA model (a prefill of two sequences): in the
    logits, and in the K/V rows the cache's KV-write listeners saw (what a prefill service ships)."""
    from zeroc.config import CacheConfig, ModelConfig
    from zeroc.kv_cache import PagedKVCache, layer_shapes
    from zeroc.model import Transformer
    from zeroc_kernels.attention import TorchBackend, TritonBackend

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    model.init_rope()
    tokens = torch.randint(0, cfg.vocab_size, (70,), device=device)
    logits, seen = [], []
    for backend in (TritonBackend(), TorchBackend()):
        model.backend = backend
        cache = PagedKVCache(layer_shapes(cfg), CacheConfig(16, 16), dtype, device=device)
        batch = cache.schedule([("a", 50), ("b", 20)])
        rows = []
        with torch.inference_mode(), cache.listening(lambda layer, slots, k, v: rows.append(torch.cat([k, v], -1))):
            logits.append(model.forward_paged(tokens, batch.positions, batch, cache).float())
        seen.append(torch.stack(rows).float())
    if seen[0].shape != seen[1].shape:
        return float("inf")
    return max((logits[0] - logits[1]).abs().max().item(), (seen[0] - seen[1]).abs().max().item())
