"""One prepared GPU run for the kernels issue: ceilings, correctness, then timings.

    python benchmarks/gpu_kernels.py --json $OUT/gpu_kernels.json     # on an H100/H200, ~3 min
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --quick        # CPU smoke run (tiny shapes)

1. Ceilings: device copy bandwidth (GB/s) and bf16 GEMM rate (TFLOP/s).
2. Correctness: every Triton kernel against its reference on mid-size shapes (max abs error).
3. Timings on Llama-3-8B attention shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128),
   uncompressed vs ZeroC fold at rank 64: decode attention (batch 64 x context 8192, with the
   fraction of copy bandwidth achieved over the KV bytes read), prefill attention (4096 and
   16384 tokens) against torch SDPA, and the attention block (QKV GEMM, epilogue, attention,
   O GEMM).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.paged_attention import paged_attention_ref  # noqa: E402
from kernels.paged_decode import (paged_decode_attention, paged_decode_attention_int8_ref,  # noqa: E402
                                  paged_decode_attention_ref)
from kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from kernels.qkv_epilogue import qkv_epilogue, qkv_epilogue_ref  # noqa: E402

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
    n, r = 20, 32
    args = (torch.randn(n, 8, r, **gen_kw), torch.randn(n, 2, r, **gen_kw), torch.randn(n, 2, 48, **gen_kw),
            torch.randint(0, 8192, (n,), device=device), torch.rand(2, r // 2, device=device),
            torch.randperm(64, device=device)[:n])
    pools = [(torch.zeros(4, 16, 2, r, **gen_kw), torch.zeros(4, 16, 2, 48, **gen_kw)) for _ in range(2)]
    errors["qkv_epilogue"] = (qkv_epilogue(*args, *pools[0]).float() - qkv_epilogue_ref(*args, *pools[1]).float()
                              ).abs().max().item()
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
    return rows


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
    """Attention block: QKV GEMM -> epilogue (RoPE + cache write) -> attention -> O GEMM."""
    rows = []
    for tokens in s["prefill"]:
        base = None
        for name, dim in (("uncompressed", s["head_dim"]), (f"zeroc fold rank {s['rank']}", s["rank"])):
            heads, kv = s["heads"], s["kv_heads"]
            x = torch.randn(tokens, s["hidden"], dtype=dtype, device=device)
            w_qkv = torch.randn((heads + 2 * kv) * dim, s["hidden"], dtype=dtype, device=device) * 0.02
            w_o = torch.randn(s["hidden"], heads * dim, dtype=dtype, device=device) * 0.02
            k_pool, v_pool, tables, lens = paged_kv(1, tokens, kv, dim, dim, s["block_size"], dtype, device)
            inv_freq = torch.rand(kv, dim // 2, device=device)
            positions = torch.arange(tokens, device=device)
            slots = torch.arange(tokens, device=device)
            starts = torch.tensor([0, tokens], device=device)
            scale = 1 / math.sqrt(s["head_dim"])

            def block():
                qkv = x @ w_qkv.T  # [T, (heads + 2 kv) * dim]
                q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], dim=-1)
                q = qkv_epilogue(q.view(tokens, heads, dim), k.view(tokens, kv, dim), v.view(tokens, kv, dim),
                                 positions, inv_freq, slots, k_pool, v_pool)
                out = paged_prefill_attention(q, k_pool, v_pool, tables, lens, starts, scale)
                return out.view(tokens, -1) @ w_o.T

            ms = timed(block, device, repeats)
            base = base or ms
            rows.append({"what": f"attention block {tokens}", "method": name, "ms": ms, "ratio": ms / base})
    return rows


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
