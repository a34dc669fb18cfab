"""benchmarks/gpu_kernels.py's `flex` section: torch's FlexAttention (kernels/flex_paged.py, the `flex` backend)
over the same pages as the paged kernels, each row beside the kernel's time on the same inputs. Imported by
gpu_kernels.py once `zeroc_kernels` is importable."""

from __future__ import annotations

import functools
import math

import torch
from gpu_kernels_cases import paged_kv, per_head_pools
from gpu_kernels_run import Run, say
from zeroc_kernels.flex_paged import compiled_flex, flex_paged_attention, plan_flex_step
from zeroc_kernels.paged_decode import paged_decode_attention
from zeroc_kernels.paged_prefill import paged_prefill_attention


def flex(run: Run) -> None:
    """torch's FlexAttention over the same pages (kernels/flex_paged.py, compiled for these shapes), beside the
    paged kernels (decode uncompressed, at rank 64 and per-head ranks; a prompt after a cached prefix): issue 17's
    "a maintained library where it beats the hand-written kernel". Each call zeroes the last pages' tails, as the
    flex backend does in every layer; the block mask is built once per step (plan_ms)."""
    s, attend = run.s, compiled_flex(dynamic=False)
    scale, kv, heads, bs = 1 / math.sqrt(s["head_dim"]), s["kv_heads"], s["heads"], s["block_size"]
    b, ctx = s["decode_batch"], s["decode_ctx"]
    for name, dim in (("uncompressed", s["head_dim"]), (f"zeroc rank {s['rank']}", s["rank"])):
        if run.left() <= 0:
            return
        k, v, tables, lens = paged_kv(b, ctx, kv, dim, dim, bs, run.dtype, run.device)
        q = torch.randn(b, heads, dim, dtype=run.dtype, device=run.device)
        starts = torch.arange(b + 1, device=run.device)
        plan = functools.partial(plan_flex_step, tables, lens, starts, b, bs, k.shape[0], 1)
        _flex_row(run, f"decode b{b} x {ctx}", name, (k.numel() + v.numel()) * k.element_size(),
                  lambda: paged_decode_attention(q, k, v, tables, lens, scale), plan,
                  lambda step: flex_paged_attention(q, k, v, tables, lens, starts, scale, 1, attend, step))
    if run.left() > 0:
        _flex_per_head(run, attend)
    new, prefix = s["prefix"]
    if run.left() > 0:
        k, v, tables, lens = paged_kv(1, new + prefix, kv, s["head_dim"], s["head_dim"], bs, run.dtype, run.device)
        q = torch.randn(new, heads, s["head_dim"], dtype=run.dtype, device=run.device)
        starts = torch.tensor([0, new], device=run.device)
        plan = functools.partial(plan_flex_step, tables, lens, starts, new, bs, k.shape[0], new)
        _flex_row(run, f"prefill {new} after {prefix} cached", "uncompressed", None,
                  lambda: paged_prefill_attention(q, k, v, tables, lens, starts, scale), plan,
                  lambda step: flex_paged_attention(q, k, v, tables, lens, starts, scale, new, attend, step))


def _flex_per_head(run: Run, attend) -> None:
    """Per-head ranks (decode_per_head's pools): a call per run over column views of the pools, one plan for
    both, as a layer of the flex backend runs them."""
    s, b = run.s, run.s["decode_batch"]
    qs, views, tables, lens, nbytes, widths = per_head_pools(s, run.dtype, run.device)
    scale, starts = 1 / math.sqrt(s["head_dim"]), torch.arange(b + 1, device=run.device)
    plan = functools.partial(plan_flex_step, tables, lens, starts, b, s["block_size"], views[0][0].shape[0], 1)

    def runs(call):  # both runs' outputs, flattened side by side: [B, heads_0 * w_0 + heads_1 * w_1]
        return torch.cat([call(q, kc, vc).flatten(1) for q, (kc, vc) in zip(qs, views)], 1)

    _flex_row(run, f"decode b{b} x {s['decode_ctx']}", f"zeroc per-head ranks {widths[0]}/{widths[1]} (2 runs)",
              nbytes, lambda: runs(lambda q, kc, vc: paged_decode_attention(q, kc, vc, tables, lens, scale)), plan,
              lambda step: runs(lambda q, kc, vc: flex_paged_attention(q, kc, vc, tables, lens, starts, scale, 1,
                                                                       attend, step)))


def _flex_row(run: Run, what: str, name: str, nbytes, kernel, plan, flex_call) -> None:
    """kernel(): the paged kernel's output; plan(): the step's FlexStep; flex_call(step): FlexAttention's output."""
    step = plan()
    err = (flex_call(step).float() - kernel().float()).abs().max().item()
    kernel_ms, flex_ms, plan_ms = run.timed(kernel), run.timed(lambda: flex_call(step)), run.timed(plan)
    r = run.row(section="flex", what=what, method=f"{name}, FlexAttention", ms=flex_ms, kernel_ms=kernel_ms,
                plan_ms=plan_ms, vs_kernel=kernel_ms / flex_ms, max_err_vs_kernel=err,
                of_copy=nbytes / flex_ms / 1e6 / run.report["ceilings"]["copy_GBps"] if nbytes else None)
    say(f"  {what} {name}: FlexAttention {flex_ms:.3f} ms a layer (+ {plan_ms:.3f} ms a step to plan), the paged "
        f"kernel {kernel_ms:.3f} ms (x{r['vs_kernel']:.2f} of the kernel's speed), max |diff| {err:.4f}")
