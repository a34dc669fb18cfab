"""CPU attention candidates over the paged cache, side by side, on the bundled model's geometry
(6 query heads, 2 KV heads, head_dim 64, fp32, 16-token blocks). Run by hand, not in CI.

    .venv/bin/python benchmarks/ragged_cpu_attention.py --threads 1 2

Candidates, each against the same step (one layer's attention call):
- ref: `paged_attention_ref` (gathers every padded context twice, dense mask, queries padded to the longest);
- sdpa-per-seq: pure torch, per sequence: that sequence's blocks gathered once, SDPA with GQA, no mask for
  decode rows and whole prompts, a small offset mask only for chunks after a cached prefix;
- ragged-cpp: the C++ kernel (kernels/ragged_cpu.py), reading the cache in place.
Cases: decode at batch 1/4/16 with contexts 256 and 2048, and a mixed step (one 256-token prompt plus 15
decodes at 1024). Candidates are timed round-robin; the best and the median of `--repeats` calls.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from zeroc_kernels.paged_attention import paged_attention_ref
from zeroc_kernels.ragged_cpu import load_ragged_kernel, ragged_paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 64, 16


def sdpa_per_seq(q, k_cache, v_cache, tables, lens, starts, scale):
    # q: [N, heads, d] -> [N, heads, dv]; one SDPA per sequence over its own gathered blocks
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    bs = k_cache.shape[1]
    for b, (n, s0, s1) in enumerate(zip(lens.tolist(), starts[:-1].tolist(), starts[1:].tolist())):
        ids = tables[b, : -(-n // bs)]
        k = k_cache[ids].flatten(0, 1)[:n].transpose(0, 1)[None]  # [1, kv, n, d]
        v = v_cache[ids].flatten(0, 1)[:n].transpose(0, 1)[None]
        ql = s1 - s0
        mask = None
        if 1 < ql < n:
            mask = torch.arange(n)[None, :] <= (n - ql + torch.arange(ql))[:, None]
        o = F.scaled_dot_product_attention(q[s0:s1].transpose(0, 1)[None], k, v, attn_mask=mask,
                                           is_causal=ql == n and ql > 1, scale=scale, enable_gqa=True)
        out[s0:s1] = o[0].transpose(0, 1)
    return out


def make_step(q_lens, ctx_lens, gen):
    """A step: sequence b has ctx_lens[b] tokens in the cache (its q_lens[b] new ones included)."""
    need = [-(-n // BLOCK) for n in ctx_lens]
    num_blocks = sum(need) + 64  # room as in a real pool: other sequences' blocks around these
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need)
    tables = torch.tensor([[perm.pop() for _ in range(n)] + [0] * (width - n) for n in need], dtype=torch.int32)
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()))
    q = torch.randn(sum(q_lens), HEADS, DIM, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens), starts


def cases():
    for batch in (1, 4, 16):
        for ctx in (256, 2048):
            yield f"decode b={batch} ctx={ctx}", [1] * batch, [ctx] * batch
    yield "mixed 256-prompt + 15 decodes ctx=1024", [256] + [1] * 15, [256] + [1024] * 15


def best_ms(cands, step, scale, repeats):
    """Candidates timed round-robin, `repeats` calls each after a warm-up; the best call of each (the least
    disturbed by other processes on a shared machine) and the median beside it."""
    times = {c: [] for c in cands}
    for fn in cands.values():
        fn(*step, scale)
    for _ in range(repeats):
        for c, fn in cands.items():
            t = time.perf_counter()
            fn(*step, scale)
            times[c].append(time.perf_counter() - t)
    return {c: (1e3 * min(ts), 1e3 * statistics.median(ts)) for c, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    kernel = load_ragged_kernel()
    cands = {"ref": paged_attention_ref, "sdpa-per-seq": sdpa_per_seq}
    if kernel is not None:
        cands["ragged-cpp"] = lambda *a: ragged_paged_attention(kernel, *a)
    print(f"# load avg {os.getloadavg()[0]:.2f}; ms per call, best (median) of {args.repeats}, round-robin")
    print("| case | threads | " + " | ".join(cands) + " | ref / ragged-cpp |")
    print("|---|---|" + "---|" * (len(cands) + 1))
    gen = torch.Generator().manual_seed(0)
    scale = 1 / math.sqrt(DIM)
    for name, q_lens, ctx_lens in cases():
        step = make_step(q_lens, ctx_lens, gen)
        want = paged_attention_ref(*step, scale)
        for fn in cands.values():  # every candidate agrees before it is timed
            torch.testing.assert_close(fn(*step, scale), want, atol=1e-4, rtol=1e-4)
        for threads in args.threads:
            torch.set_num_threads(threads)
            ms = best_ms(cands, step, scale, args.repeats)
            ratio = ms["ref"][0] / ms["ragged-cpp"][0] if "ragged-cpp" in ms else float("nan")
            print(f"| {name} | {threads} | " + " | ".join(f"{b:.3f} ({m:.3f})" for b, m in ms.values())
                  + f" | {ratio:.1f}x |", flush=True)
    print(f"# load avg {os.getloadavg()[0]:.2f} at the end")

if __name__ == "__main__":
    main()
