"""Attention over dense rows by torch's SDPA: the backends' `fresh_prefill` (a prompt with no cached prefix
attends its own rows) and `dense_partials` (one sequence's attention with its log-sum-exp, which a token tier's
prompt chunks merge with their full-rank segment), and the fp32 oracle of the latter. kernels/attention.py's
backends call them; no kernel of ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc_kernels.paged_attention import one_width, segment_attention


def sdpa_fresh_prefill(q: Tensor, k: Tensor, v: Tensor, query_lens: tuple[int, ...], scale: float) -> Tensor:
    """`AttentionBackend.fresh_prefill` by torch's SDPA, one call per sequence (a fresh batch holds few)."""
    dv = v.shape[-1]
    q, k, v = one_width(q, k, v)
    outs, at = [], 0
    for n in query_lens:
        rows = slice(at, at + n)  # [n, heads or kv_heads, width] -> [1, heads or kv_heads, n, width]
        out = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None].to(q.dtype),
            v[rows].transpose(0, 1)[None].to(q.dtype), is_causal=True, scale=scale, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))  # [n, heads, width], a view
        at += n
    # Token-major, as the output projection reads it. One sequence's output is a view of what SDPA wrote: the
    # concatenation copied it head-major first, and the projection's reshape copied it back (two passes over
    # [n, heads, width]; at 4,096 tokens on an H100 this path ran 0.1 ms behind SDPA alone). Several sequences
    # are joined by one copy, straight into token order.
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[..., :dv]  # [N, heads, dv]


def dense_lse_ref(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True) -> tuple[Tensor, Tensor]:
    """`AttentionBackend.dense_partials` in fp32 PyTorch ([Tq, Tk] scores): the oracle."""
    seen = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
    out, lse = segment_attention(q[None], k[None], v[None], seen.tril() if causal else seen, scale)
    return out[0], lse[0]


def _flash_with_lse(q: Tensor):
    """torch's fused flash attention op that returns the log-sum-exp, for q's device and dtype, or None: on the
    CPU its flash kernel (any float dtype); on CUDA FlashAttention-2 (fp16, bf16). Both take (q, k, v, dropout,
    causal, scale=) in [B, heads, T, d] with kv_heads dividing heads, and return (out, lse [B, heads, T], ...)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention
    return None


def sdpa_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True) -> tuple[Tensor, Tensor]:
    """`AttentionBackend.dense_partials` by torch's fused flash kernels (public SDPA hides the LSE), with the
    reference where none serves the inputs. q, k and v are zero-padded to one width, a multiple of 8 up to 256
    (FlashAttention-2's limit; wider goes to the reference)."""
    dv, op = v.shape[-1], _flash_with_lse(q)
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[0]} and {k.shape[0]}")
    if op is None or max(q.shape[-1], dv) > 256:
        return dense_lse_ref(q, k, v, scale, causal)
    heads_major = (x.transpose(0, 1)[None].to(q.dtype) for x in one_width(q, k, v, 8))  # [1, h, T, width] each
    out, lse = op(*heads_major, 0.0, causal, scale=scale)[:2]
    return out[0].transpose(0, 1)[..., :dv], lse[0].transpose(0, 1).float()  # [T, heads, dv], [T, heads]
