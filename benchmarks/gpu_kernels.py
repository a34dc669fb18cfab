"""One prepared GPU run for the kernels issue: ceilings, correctness, then timings.

    python benchmarks/gpu_kernels.py --json $OUT/gpu_kernels.json     # on an H100/H200, ~3 min
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --quick        # CPU smoke run (tiny shapes)

1. Ceilings: device copy bandwidth (GB/s) and bf16 GEMM rate (TFLOP/s).
2. Correctness: every Triton kernel against its reference on mid-size shapes (max abs error).
3. Timings on Llama-3-8B attention shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128),
   uncompressed vs ZeroC at rank 64: decode attention (batch 64 x context 8192, with the
   fraction of copy bandwidth achieved over the KV bytes read), prefill attention (4096 and
   16384 tokens) against torch SDPA, and the attention block (QKV GEMM, epilogue, attention,
   O GEMM) uncompressed vs fold vs rotate; the runtime's fused model path against its unfused one;
   decode attention with per-KV-head ranks (half the KV heads at 48, half at 80: the same
   bytes as rank), one kernel call per run over column views of one row (zeroc/head_ranks.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from zeroc_kernels.paged_attention import paged_attention_int8_ref, paged_attention_ref  # noqa: E402
from zeroc_kernels.paged_decode import (paged_decode_attention, paged_decode_attention_int8_ref,  # noqa: E402
                                  paged_decode_attention_ref)
from zeroc_kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from zeroc_kernels.qkv_epilogue import (qkv_epilogue, qkv_epilogue_ref, qkv_rotate_epilogue,  # noqa: E402
                                  qkv_rotate_epilogue_ref)

FULL = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, rank=64, decode_batch=64, decode_ctx=8192,
            prefill=(4096, 16384), block_size=16)
QUICK = dict(hidden=64, heads=4, kv_heads=2, head_dim=32, rank=16, decode_batch=2, decode_ctx=64,
             prefill=(32,), block_size=16)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def paged_kv(batch: int, ctx: int, kv_heads: int, dq: int, dv: int, block_size: int, dtype, device):
    """Contiguous-per-sequence block tables over one pool -> k_cache, v_cache, tables, lens."""
    blocks = ctx // block_size
    k = torch.randn(batch * blocks, block_size, kv_heads, dq, dtype=dtype, device=device)
    v = torch.randn(batch * blocks, block_size, kv_heads, dv, dtype=dtype, device=device)
    tables = torch.arange(batch * blocks, device=device).view(batch, blocks)
    return k, v, tables, torch.full((batch,), ctx, device=device)


def ceilings(device, dtype, quick: bool, repeats: int) -> dict:
    n = (1 << 20) if quick else (1 << 29)  # 1 GiB of bf16 on a GPU
    src, dst = torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
    copy_ms = timed(lambda: dst.copy_(src), device, repeats)
    m = 256 if quick else 8192
    a, b = torch.randn(m, m, dtype=dtype, device=device), torch.randn(m, m, dtype=dtype, device=device)
    gemm_ms = timed(lambda: a @ b, device, repeats)
    return {"copy_GBps": 2 * n * src.element_size() / copy_ms / 1e6, "gemm_TFLOPs": 2 * m**3 / gemm_ms / 1e9}


def correctness(device, dtype) -> dict:
    """Max abs error of each kernel against its reference on a mid-size ragged case."""
    gen_kw = dict(dtype=dtype, device=device)
    k, v, tables, lens = paged_kv(3, 96, 2, 64, 48, 16, dtype, device)
    lens = torch.tensor([96, 50, 7], device=device)
    q = torch.randn(3, 8, 64, **gen_kw)
    ref = paged_decode_attention_ref(q.float(), k.float(), v.float(), tables, lens, 0.125)
    errors = {f"decode_splits{s}": (paged_decode_attention(q, k, v, tables, lens, 0.125, num_splits=s).float()
                                    - ref).abs().max().item() for s in (1, 4)}
    kq, vq = (torch.randint(-127, 128, k.shape, dtype=torch.int8, device=device) for _ in range(2))
    ks, vs = (torch.rand(k.shape[:3], device=device) / 127 for _ in range(2))
    ref = paged_decode_attention_int8_ref(q, kq, vq, ks, vs, tables, lens, 0.125)
    errors["decode_int8"] = (paged_decode_attention(q, kq, vq, tables, lens, 0.125, k_scales=ks, v_scales=vs).float()
                             - ref.float()).abs().max().item()
    starts = torch.tensor([0, 40, 41, 48], device=device)
    qp = torch.randn(48, 8, 64, **gen_kw)
    ref = paged_attention_ref(qp.float(), k.float(), v.float(), tables, lens, starts, 0.125)
    errors["prefill"] = (paged_prefill_attention(qp, k, v, tables, lens, starts, 0.125).float() - ref).abs().max().item()
    ref = paged_attention_int8_ref(qp, kq, vq, ks, vs, tables, lens, starts, 0.125).float()
    errors["prefill_int8"] = (paged_prefill_attention(qp, kq, vq, tables, lens, starts, 0.125, k_scales=ks,
                                                      v_scales=vs).float() - ref).abs().max().item()
    n, r = 20, 32
    args = (torch.randn(n, 8, r, **gen_kw), torch.randn(n, 2, r, **gen_kw), torch.randn(n, 2, 48, **gen_kw),
            torch.randint(0, 8192, (n,), device=device), torch.rand(2, r // 2, device=device),
            torch.randperm(64, device=device)[:n])
    pools = [(torch.zeros(4, 16, 2, r, **gen_kw), torch.zeros(4, 16, 2, 48, **gen_kw)) for _ in range(2)]
    errors["qkv_epilogue"] = (qkv_epilogue(*args, *pools[0]).float() - qkv_epilogue_ref(*args, *pools[1]).float()
                              ).abs().max().item()
    d = 64  # rotate mode: full-width q/k in, rank-r out through each KV head's bases
    rot = (torch.randn(n, 8, d, **gen_kw), torch.randn(n, 2, d, **gen_kw), args[2], args[3],
           torch.rand(1, d // 2, device=device), torch.randn(2, d, r, **gen_kw) / 8, torch.randn(2, d, r, **gen_kw) / 8,
           args[5])
    errors["qkv_rotate_epilogue"] = (qkv_rotate_epilogue(*rot, *pools[0]).float()
                                     - qkv_rotate_epilogue_ref(*rot, *pools[1]).float()).abs().max().item()
    # per-KV-head ranks: each run of equal-rank heads read in place through a column view of the row pool
    from zeroc.head_ranks import HeadLayout

    layout = HeadLayout.of((16, 16, 48), (8, 8, 32), group=4)  # runs: 2 heads at (16, 8), 1 at (48, 32)
    k_row, v_row, tables, _ = paged_kv(3, 96, 1, 2 * 16 + 48, 2 * 8 + 32, 16, dtype, device)
    views = zip(layout.pool_views(k_row, [16, 48]), layout.pool_views(v_row, [8, 32]))
    for i, (run, (kc, vc)) in enumerate(zip(layout.runs, views)):
        name, heads = f"run{i}", run.heads
        qd, qp = torch.randn(3, 4 * heads, kc.shape[-1], **gen_kw), torch.randn(48, 4 * heads, kc.shape[-1], **gen_kw)
        ref = paged_decode_attention_ref(qd.float(), kc.float(), vc.float(), tables, lens, 0.125)
        errors[f"decode_per_head_{name}"] = (paged_decode_attention(qd, kc, vc, tables, lens, 0.125).float()
                                             - ref).abs().max().item()
        ref = paged_attention_ref(qp.float(), kc.float(), vc.float(), tables, lens, starts, 0.125)
        errors[f"prefill_per_head_{name}"] = (paged_prefill_attention(qp, kc, vc, tables, lens, starts, 0.125).float()
                                              - ref).abs().max().item()
    return errors


def decode_timings(s: dict, device, dtype, repeats: int, copy_gbps: float) -> list[dict]:
    rows = []
    for name, dim in (("uncompressed", s["head_dim"]), (f"zeroc rank {s['rank']}", s["rank"])):
        k, v, tables, lens = paged_kv(s["decode_batch"], s["decode_ctx"], s["kv_heads"], dim, dim, s["block_size"],
                                      dtype, device)
        q = torch.randn(s["decode_batch"], s["heads"], dim, dtype=dtype, device=device)
        scale = 1 / math.sqrt(s["head_dim"])
        ms = timed(lambda: paged_decode_attention(q, k, v, tables, lens, scale), device, repeats)
        kv_bytes = 2 * k.numel() * k.element_size()
        rows.append({"what": f"decode attention b{s['decode_batch']} x {s['decode_ctx']}", "method": name, "ms": ms,
                     "bandwidth_fraction": kv_bytes / ms / 1e6 / copy_gbps})
    # The int8 compressed cache read directly by the kernel (rows + one fp32 scale per token and head).
    kq, vq = (torch.randint(-127, 128, k.shape, dtype=torch.int8, device=device) for _ in range(2))
    ks, vs = (torch.rand(k.shape[:3], device=device) / 127 for _ in range(2))
    ms = timed(lambda: paged_decode_attention(q, kq, vq, tables, lens, scale, k_scales=ks, v_scales=vs),
               device, repeats)
    kv_bytes = 2 * (kq.numel() + 4 * ks.numel())
    rows.append({"what": f"decode attention b{s['decode_batch']} x {s['decode_ctx']}",
                 "method": f"zeroc rank {s['rank']} int8", "ms": ms, "bandwidth_fraction": kv_bytes / ms / 1e6 / copy_gbps})
    rows.append(per_head_decode(s, device, dtype, repeats, copy_gbps))
    return rows


def per_head_decode(s: dict, device, dtype, repeats: int, copy_gbps: float) -> dict:
    """Decode attention at per-KV-head ranks: half the KV heads at rank - rank/4, half at rank + rank/4 (the
    bytes of rank), cached as one row per token and attended as two runs through column views of its pools."""
    from zeroc.head_ranks import HeadLayout

    half, r, group = s["kv_heads"] // 2, s["rank"], s["heads"] // s["kv_heads"]
    widths = [r - r // 4, r + r // 4]
    layout = HeadLayout.of((widths[0],) * half + (widths[1],) * half, (widths[0],) * half + (widths[1],) * half, group)
    k, v, tables, lens = paged_kv(s["decode_batch"], s["decode_ctx"], 1, 2 * half * r, 2 * half * r,
                                  s["block_size"], dtype, device)
    views = list(zip(layout.pool_views(k, widths), layout.pool_views(v, widths)))
    qs = [torch.randn(s["decode_batch"], half * group, w, dtype=dtype, device=device) for w in widths]
    scale = 1 / math.sqrt(s["head_dim"])
    ms = timed(lambda: [paged_decode_attention(q, kc, vc, tables, lens, scale) for q, (kc, vc) in zip(qs, views)],
               device, repeats)
    kv_bytes = 2 * k.numel() * k.element_size()
    return {"what": f"decode attention b{s['decode_batch']} x {s['decode_ctx']}",
            "method": f"zeroc per-head ranks {widths[0]}/{widths[1]} (2 runs)", "ms": ms,
            "bandwidth_fraction": kv_bytes / ms / 1e6 / copy_gbps}


def prefill_timings(s: dict, device, dtype, repeats: int) -> list[dict]:
    rows = []
    for tokens in s["prefill"]:
        for name, dim in (("uncompressed", s["head_dim"]), (f"zeroc rank {s['rank']}", s["rank"])):
            k, v, tables, lens = paged_kv(1, tokens, s["kv_heads"], dim, dim, s["block_size"], dtype, device)
            q = torch.randn(tokens, s["heads"], dim, dtype=dtype, device=device)
            starts = torch.tensor([0, tokens], device=device)
            scale = 1 / math.sqrt(s["head_dim"])
            ms = timed(lambda: paged_prefill_attention(q, k, v, tables, lens, starts, scale), device, repeats)
            rows.append({"what": f"prefill attention {tokens}", "method": f"{name} (triton, paged)", "ms": ms})
            qs = q.transpose(0, 1)[None]  # [1, heads, T, d]
            ks = k.view(tokens, s["kv_heads"], dim).transpose(0, 1)[None]
            sdpa = lambda: F.scaled_dot_product_attention(qs, ks, ks, is_causal=True, enable_gqa=True)  # noqa: E731
            rows.append({"what": f"prefill attention {tokens}", "method": f"{name} (torch sdpa)",
                         "ms": timed(sdpa, device, repeats)})
    return rows


def block_timings(s: dict, device, dtype, repeats: int) -> list[dict]:
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

            ms = timed(block, device, repeats)
            base = base or ms
            rows.append({"what": f"attention block {tokens}", "method": name, "ms": ms, "ratio": ms / base})
    return rows


def model_path_error(device, dtype) -> float:
    """Max abs logit difference between `Transformer.forward_paged` with the fused epilogue (the CUDA
    path) and without it, on a small random GQA model: a prefill of two sequences."""
    from zeroc.config import CacheConfig, ModelConfig
    from zeroc.kv_cache import PagedKVCache, layer_shapes
    from zeroc.model import Transformer

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    model.init_rope()
    tokens = torch.randint(0, cfg.vocab_size, (70,), device=device)
    logits = []
    for fused in (True, False):
        cache = PagedKVCache(layer_shapes(cfg), CacheConfig(16, 16), dtype, device=device)
        batch = cache.schedule([("a", 50), ("b", 20)])
        with torch.inference_mode():
            logits.append(model.forward_paged(tokens, batch.positions, batch, cache,
                                              fused=fused).float())
    return (logits[0] - logits[1]).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run under TRITON_INTERPRET=1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, repeats = (QUICK, 1) if args.quick else (FULL, args.repeats)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "date": time.strftime("%Y-%m-%d"), "shapes": {k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in shapes.items()}}
    report["ceilings"] = ceilings(device, dtype, args.quick, repeats)
    report["max_abs_error"] = correctness(device, dtype)
    report["max_abs_error"]["model_fused_vs_unfused_logits"] = model_path_error(device, dtype)
    report["timings"] = decode_timings(shapes, device, dtype, repeats, report["ceilings"]["copy_GBps"])
    report["timings"] += prefill_timings(shapes, device, dtype, repeats)
    report["timings"] += block_timings(shapes, device, dtype, repeats)
    print(f"{report['device']} {report['dtype']}: copy {report['ceilings']['copy_GBps']:.0f} GB/s, "
          f"GEMM {report['ceilings']['gemm_TFLOPs']:.1f} TFLOP/s")
    print("max abs error vs reference:", json.dumps(report["max_abs_error"]))
    print("| what | method | ms | of copy bandwidth | / uncompressed |\n|---|---|---:|---:|---:|")
    for row in report["timings"]:
        frac = f"{row['bandwidth_fraction']:.0%}" if "bandwidth_fraction" in row else ""
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
        print(f"| {row['what']} | {row['method']} | {row['ms']:.3f} | {frac} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
