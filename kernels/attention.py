"""Attention backends: the one object through which the runtime runs its attention kernels.

A backend is chosen once, when a model is loaded (`select_backend`, the `--attention-backend` setting),
never by looking at a tensor's device or an argument's type on the hot path. Callers:
- `zeroc.model` (the paged forward): `paged_attention` over plain pools, and, where `fused_epilogue`
  holds, the QKV epilogue that applies RoPE (and rotate mode's bases) and writes K/V into their slots;
- KV-policy pools (int8's): `paged_attention` with scales, `quantize_into_slots`; a token tier's pools:
  `decode_partials` for the compressed segment of a decode step (the decode kernel from a key on, unmerged),
  then `tier_decode` for its full-rank segment and the merge (one kernel on triton); `dense_partials` for the
  compressed segment of a prompt's chunk (dense rows, causal or not, with LSEs: torch's flash kernel);
- `zeroc.model`'s layers: `rms_norm` and `silu_mul`, which the triton backend runs as one kernel each
  (kernels/layer_ops.py): at decode batch sizes a layer's eager norms and gate are some twenty tiny kernels;
  and `linear`, every GEMM of the model (`zeroc.layers.Linear`), which the cpu backend runs through oneDNN;
- the engine's sampling (zeroc/structured.py): `apply_token_bitmask`, structured output's mask
  (kernels/token_bitmask.py; one Triton kernel on triton, one C++ call on cpu).

Backends:
- `TorchBackend` ("torch"): the PyTorch references, on any device. Writes happen in PyTorch before
  attention; no fused epilogue.
- `CpuBackend` ("cpu"): the torch backend with the ragged C++ kernel (kernels/ragged_cpu.py) for attention,
  which reads the paged cache in place, and oneDNN for fp32 GEMMs. CPU only; built with g++ on first use.
  "auto" picks it on the CPU where it builds, else "torch".
- `TritonBackend` ("triton"): the Triton kernels: the decode kernel for decode-only steps, the ragged
  prefill kernel otherwise, the fused QKV epilogue, the fused norm and gate. On CUDA it compiles; on the
  CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1), which is how CI drives the GPU path.
- `FlexBackend` ("flex"): triton with plain pools' paged attention by torch's FlexAttention, compiled
  (kernels/flex_paged.py): a maintained kernel measured against ours (benchmarks/gpu_kernels.py).

A prompt with no cached prefix (the prefill service's work, a first step) needs no paged read at all:
every sequence attends its own new rows. From `fresh_prefill_min_tokens` new tokens up, the cpu and
triton backends hand such steps to torch's SDPA (FlashAttention or cuDNN on CUDA, its flash kernel on the
CPU), which beats the hand-written paged kernels there: on an H200 SDPA ran 2.1x the Triton prefill
kernel at 4,096 tokens and 1.9x at 16,384; on the 2-core Xeon 1.7x the ragged C++ kernel at 2,048
(docs/benchmarks.md). Prompts after a cached prefix and every decode row stay on the paged kernels.

To add a backend (a maintained library, say), subclass `AttentionBackend`, implement its methods with
the same shapes and numerics as the references, register it in `BACKENDS`, and run
tests/kernels/test_attention.py over it.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc.config.model import ATTENTION_BACKENDS
from zeroc_kernels.cpu_layer_ops import cpu_add_rms_norm, cpu_apply_rope, cpu_rms_norm
from zeroc_kernels.cpu_linear import WeightPack, onednn_linear, prepack
from zeroc_kernels.kv_quant import quantize_into_slots_ref
from zeroc_kernels.layer_ops import add_rms_norm_ref, rms_norm_ref, silu_mul_ref
from zeroc_kernels.paged_attention import (check_int8_args, dequantize_named_blocks, paged_attention_int8_ref,
                                           paged_attention_ref)
from zeroc_kernels.ragged_cpu import (load_ragged_kernel, ragged_decode_partials, ragged_paged_attention,
                                     ragged_tier_decode)
from zeroc_kernels.qkv_epilogue import (apply_rope_ref, qkv_epilogue_ref, qkv_rotate_epilogue_ref, rope_ref,
                                        tier_qkv_ref)
from zeroc_kernels.sdpa import dense_lse_ref, sdpa_fresh_prefill, sdpa_lse
from zeroc_kernels.token_bitmask import apply_token_bitmask_ref

if TYPE_CHECKING:  # the module imports triton, which processes on the torch backend never load
    from zeroc_kernels.tier_decode import TierSlots

logger = logging.getLogger(__name__)


class AttentionBackend(abc.ABC):
    """How attention and cache writes run. Shapes as in `paged_attention_ref` and `qkv_epilogue_ref`."""

    name: str
    fused_epilogue: bool = False  # whether the model hands q/k/v to `qkv_epilogue` before RoPE
    # Whether an Engine runs the model's Q/K/V and gate/up projections as one GEMM each
    # (`Transformer.fuse_projections`): on a GPU each GEMM is a launch and narrow ones run under the copy rate; on
    # the CPU a packed oneDNN GEMM pays some 15-25 us a call (the cpu backend), where MKL's sgemm on the torch
    # backend measured no faster fused (benchmarks/fused_projections.py, docs/benchmarks.md).
    fuses_projections: bool = False
    # Whether `rope` is one kernel per tensor, so RoPE outside the epilogue (per-KV-head ranks, a token tier's
    # dims, the dense forward) calls it per layer instead of sharing eager cos/sin tables (zeroc/rope.py)
    fused_rope: bool = False
    # Whether a decode step through it reads nothing back to the host and keeps its shapes, so that a CUDA graph can
    # hold the step (zeroc/decode_runner.py): the references do host work, the Triton kernels take lengths on device.
    graph_safe: bool = False
    # From this many new tokens in a fresh batch's longest sequence, `fresh_prefill` attends it; None: never.
    fresh_prefill_min_tokens: int | None = None

    def attends_fresh(self, longest: int | None) -> bool:
        """Whether a fresh batch (PagedBatch.fresh) whose longest sequence has `longest` new tokens goes
        through `fresh_prefill` instead of `paged_attention`."""
        floor = self.fresh_prefill_min_tokens
        return floor is not None and longest is not None and longest >= floor

    def fresh_prefill(self, q: Tensor, k: Tensor, v: Tensor, query_lens: tuple[int, ...], scale: float) -> Tensor:
        """q: [N, heads, dq]; k: [N, kv_heads, dq]; v: [N, kv_heads, dv]: the rows of sequences whose whole
        context is their new tokens, sequence after sequence (query_lens[b] rows each, on the host)
        -> [N, heads, dv]: causal attention of each sequence over its own rows."""
        return sdpa_fresh_prefill(q, k, v, query_lens, scale)

    def dense_partials(self, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True
                       ) -> tuple[Tensor, Tensor]:
        """q: [Tq, heads, dq]; k: [Tk, kv_heads, dq]; v: [Tk, kv_heads, dv]: one sequence's queries over dense key
        rows, causally (Tq == Tk, query i over keys <= i) or over all of them -> (out [Tq, heads, dv], lse [Tq, heads]
        fp32, natural log), unmerged, for a caller that merges them with attention over other keys (a token tier's
        prompt chunks, zeroc/tier.py `tiered_chunk_attention`)."""
        return sdpa_lse(q, k, v, scale, causal)

    def plan(self, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, num_tokens: int,
             block_size: int, num_blocks: int, max_q: int | None) -> object | None:
        """What `paged_attention` derives from a step's batch alone (shapes there; num_tokens: N), once for all
        its layers: the caller that attends every layer of a step (zeroc/attend.py PagedAttend) calls this before
        the first and hands the result to each layer's call as `plan`. None: nothing to derive (all but flex)."""
        return None

    @abc.abstractmethod
    def paged_attention(
        self,
        q: Tensor,  # [N, heads, dq] new queries, concatenated over sequences
        k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq], int8 with k_scales
        v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv], int8 with v_scales
        block_tables: Tensor,  # [B, max_blocks]
        seq_lens: Tensor,  # [B]
        query_start_loc: Tensor,  # [B + 1]
        scale: float,
        k_scales: Tensor | None = None,  # [num_blocks, block_size, kv_heads] fp32 per-token scales of int8 caches
        v_scales: Tensor | None = None,
        max_q: int | None = None,  # the most new tokens of one sequence (PagedBatch.max_query_len), if known
        plan: object | None = None,  # `plan`'s for these batch tensors (derived in the call when None)
    ) -> Tensor:
        """-> [N, heads, dv]: each new query over its sequence's cached context, causally. Given max_q, no
        backend reads the batch's lengths to the host: a step's forward then waits for the device nowhere."""

    def decode_partials(
        self,
        q: Tensor,  # [B, heads, dq] one query per sequence
        k_cache: Tensor,  # [num_blocks, block_size, kv_heads, dq] (last dim dense, other strides free)
        v_cache: Tensor,  # [num_blocks, block_size, kv_heads, dv]
        block_tables: Tensor,  # [B, max_blocks]
        seq_lens: Tensor,  # [B] each sequence's keys end here (>= key_start)
        scale: float,
        key_start: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Each query over its sequence's keys [key_start, seq_len), unmerged -> (out [B, heads, P, dv], lse
        [B, heads, P]): P partial outputs (the triton backend's splits) with their natural-log LSEs, -inf where
        a part held no key, for `merge_partials_ref` with attention over other keys (a token tier's segments,
        zeroc/policies/tier.py). No backend reads the device to the host."""
        from zeroc_kernels.paged_decode import decode_partials_ref  # beside its kernel, which imports triton

        return decode_partials_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, key_start)

    def tier_decode(
        self,
        q: Tensor,  # [B, heads, k_dim + tier_k] one full-rank query per sequence
        pool: Tensor,  # [num_blocks, block_size, kv_heads, k_dim + v_dim] a token tier's layer pool (contiguous)
        k_dim: int,
        slots: TierSlots,  # where each sequence's tier rows are (kernels/tier_decode.py)
        k_own: Tensor,  # [B, kv_heads, k_dim + tier_k] the new token's full-rank key
        v_own: Tensor,  # [B, kv_heads, v_dim + tier_v]
        parts: Tensor,  # [B, heads, P, v_dim] the compressed segment's `decode_partials`
        lses: Tensor,  # [B, heads, P]
        scale: float,
    ) -> Tensor:
        """A token tier's decode step after its compressed segment: each query over its full-rank keys (its
        tier slots and its own row), merged with `parts` -> [B, heads, v_dim + tier_v] (zeroc/policies/tier.py).
        No backend reads the device to the host."""
        from zeroc_kernels.tier_decode import tier_decode_ref  # beside its kernel, which imports triton

        return tier_decode_ref(q, pool, k_dim, slots, k_own, v_own, parts, lses, scale)

    @abc.abstractmethod
    def quantize_into_slots(self, x: Tensor, slot_mapping: Tensor, q_pool: Tensor, scale_pool: Tensor) -> None:
        """x: [N, kv_heads, d] rows quantised to int8 into their slots of q_pool / scale_pool, in place."""

    def qkv_epilogue(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor,
                     slot_mapping: Tensor, k_pool: Tensor, v_pool: Tensor) -> Tensor:
        """Fold / uncompressed epilogue (kernels/qkv_epilogue.py): -> q after RoPE; K/V written to slots."""
        raise NotImplementedError(f"the {self.name} backend has no fused epilogue")

    def qkv_rotate_epilogue(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor,
                            q_basis: Tensor, k_basis: Tensor, slot_mapping: Tensor, k_pool: Tensor,
                            v_pool: Tensor) -> Tensor:
        """Rotate epilogue: -> q' = A^T RoPE(q); k' = B^T RoPE(k) and v written to slots."""
        raise NotImplementedError(f"the {self.name} backend has no fused epilogue")

    # A layer's elementwise ops, which the backend may fuse (kernels/layer_ops.py). The model calls them in every
    # forward that has the backend: dense, paged, and with a caller's attention.
    def rope(self, x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
        """RoPE on x [*P, heads, r] at positions [*P]; inv_freq [R, r/2], R = 1 or R dividing heads (query heads
        share their KV head's row) -> [*P, heads, r]. Called per tensor only where `fused_rope` holds; otherwise
        zeroc.rope's tables (cos/sin once per forward, shared by layers) are cheaper."""
        return rope_ref(x, positions, inv_freq)

    def apply_rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE from a forward's shared tables (zeroc.rope.RopeTables, where `fused_rope` does not hold): x [*P, heads,
        r]; cos, sin [*P, heads or 1, r] in x's dtype, rotate_half layout -> [*P, heads, r]."""
        return apply_rope_ref(x, cos, sin)

    def tier_qkv(self, q: Tensor, k: Tensor, v: Tensor, q_tier: Tensor, k_tier: Tensor, v_tier: Tensor,
                 positions: Tensor, inv_freq: Tensor, tier_inv_freq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A fold layer's full-rank q, k, v with a token tier: q [*P, heads, r], k [*P, kv, r] after RoPE at
        inv_freq [kv or 1, r/2], joined to q_tier [*P, heads, d - r], k_tier [*P, kv, d - r] after RoPE at
        tier_inv_freq [kv or 1, (d - r)/2]; v [*P, kv, rv] joined to v_tier [*P, kv, d - rv] -> q_full [*P, heads, d],
        k_full [*P, kv, d], v_full [*P, kv, d] (kernels/qkv_epilogue.py). Called where `fused_rope` holds, as `rope`
        is."""
        return tier_qkv_ref(q, k, v, q_tier, k_tier, v_tier, positions, inv_freq, tier_inv_freq)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x: [*, H]; weight: [H] -> RMSNorm(x) [*, H]."""
        return rms_norm_ref(x, weight, eps)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """x, residual: [*, H]; weight: [H] -> (RMSNorm(x + residual), x + residual), each [*, H]."""
        return add_rms_norm_ref(x, residual, weight, eps)

    def silu_mul(self, gate: Tensor, up: Tensor) -> Tensor:
        """gate, up: [*, I] -> silu(gate) * up [*, I] (SwiGLU)."""
        return silu_mul_ref(gate, up)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, pack: WeightPack | None = None
               ) -> Tensor:
        """x: [*, in]; weight: [out, in]; bias: [out] or None -> x @ weight^T + bias [*, out]: the model's GEMMs
        (zeroc.layers.Linear runs its model's backend's). `pack`: the slot its caller keeps beside `weight`, where a
        backend may keep the weight in a faster layout (the cpu backend's oneDNN copy); others ignore it."""
        return F.linear(x, weight, bias)

    def prepack(self, weight: Tensor, pack: WeightPack) -> None:
        """weight: [out, in]. Lay `weight` out in `pack` now, as `linear` would at its first call (an Engine calls it
        for every GEMM's weight before it sizes its KV cache); a backend that keeps no layout of its own does
        nothing. A pack it fills must be what its `linear` runs on: a served model then drops the plain weight
        (`WeightPack.release`), and `linear` gets an empty placeholder in its place."""

    def apply_token_bitmask(self, scores: Tensor, packed: Tensor, r: int) -> None:
        """scores [B, V], in place: the tokens r guided rows' bitmasks exclude to the lowest finite score; packed
        [r * words + r] int32 on scores' device: the bitmasks, then each one's row (kernels/token_bitmask.py)."""
        apply_token_bitmask_ref(scores, packed, r)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __deepcopy__(self, memo: dict) -> "AttentionBackend":
        # A backend keeps no per-model state, at most a loaded kernel module (which cannot be copied): a deep
        # copy of a model (a checkpoint taken while it trains, say) shares its backend.
        return self


class TorchBackend(AttentionBackend):
    """The PyTorch references: the CPU path, and the oracle every other backend is tested against (so it
    never takes the fresh-prefill shortcut)."""

    name = "torch"

    def dense_partials(self, q, k, v, scale, causal=True):
        return dense_lse_ref(q, k, v, scale, causal)

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        k_scales=None, v_scales=None, max_q=None, plan=None):
        if check_int8_args(k_cache, v_cache, k_scales, v_scales):
            return paged_attention_int8_ref(q, k_cache, v_cache, k_scales, v_scales, block_tables, seq_lens,
                                            query_start_loc, scale, max_q)
        return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_q)

    def quantize_into_slots(self, x, slot_mapping, q_pool, scale_pool):
        quantize_into_slots_ref(x, slot_mapping, q_pool, scale_pool)


class CpuBackend(TorchBackend):
    """Attention by the ragged CPU kernel, over plain and int8 pools (the int8 blocks a step names are
    dequantised first, as the reference does), and a token tier's decode partials and full-rank segment
    (csrc/tier_decode.cpp); cache writes as the torch backend. ValueError where the kernel cannot be built (no
    compiler)."""

    name = "cpu"
    # the bundled model's Q/K/V as one packed GEMM: 0.035 against 0.062 ms at one row, gate/up 0.053 against 0.086
    fuses_projections = True
    # 2-core Xeon, fp32, 2 threads: SDPA / ragged kernel 0.60 at 2,048 tokens, 0.90-1.19 at 512, 0.86-1.16 at 128
    fresh_prefill_min_tokens = 1024

    def __init__(self, pack_weights: bool = True):
        """`pack_weights`: GEMMs on a packed oneDNN copy of each weight (held beside it), else on the weight as it
        lies (kernels/cpu_linear.py)."""
        self.pack_weights = pack_weights
        self.kernel = load_ragged_kernel()
        if self.kernel is None:
            raise ValueError("the cpu attention backend needs its C++ kernel, which could not be built here "
                             "(g++ and torch's headers are needed); use the torch backend")

    def linear(self, x, weight, bias=None, pack=None):
        # fp32 and bf16 GEMMs without gradients by oneDNN on a packed copy of the weight in the caller's slot; with
        # `pack_weights` off, oneDNN on the weight as it lies, F.linear for small ones (kernels/cpu_linear.py)
        return onednn_linear(x, weight, bias, pack if self.pack_weights else None)

    def prepack(self, weight, pack):
        if self.pack_weights:
            prepack(weight, pack)

    # A layer's norms and RoPE by csrc/layer_ops.cpp (kernels/cpu_layer_ops.py): one call each where eager PyTorch
    # dispatched nine ops and six, 60-80 us a layer at a decode step's one row on the bundled model
    def rms_norm(self, x, weight, eps):
        return cpu_rms_norm(self.kernel, x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return cpu_add_rms_norm(self.kernel, x, residual, weight, eps)

    def apply_token_bitmask(self, scores, packed, r):
        self.kernel.apply_token_bitmask(scores, packed, r)  # csrc/sampling.cpp: 19-29x the reference (kernels/README)

    def apply_rope(self, x, cos, sin):
        return cpu_apply_rope(self.kernel, x, cos, sin)

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        k_scales=None, v_scales=None, max_q=None, plan=None):
        if check_int8_args(k_cache, v_cache, k_scales, v_scales):
            k, v, tables = dequantize_named_blocks(k_cache, v_cache, k_scales, v_scales, block_tables)
            return ragged_paged_attention(self.kernel, q, k, v, tables, seq_lens, query_start_loc, scale)
        return ragged_paged_attention(self.kernel, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                      scale)

    def dense_partials(self, q, k, v, scale, causal=True):
        return sdpa_lse(q, k, v, scale, causal)

    def decode_partials(self, q, k_cache, v_cache, block_tables, seq_lens, scale, key_start=0):
        return ragged_decode_partials(self.kernel, q, k_cache, v_cache, block_tables, seq_lens, scale, key_start)

    def tier_decode(self, q, pool, k_dim, slots, k_own, v_own, parts, lses, scale):
        return ragged_tier_decode(self.kernel, q, pool, k_dim, slots, k_own, v_own, parts, lses, scale)


class ReferenceEpilogueBackend(TorchBackend):
    """The references with the fused path's structure: K/V written by the epilogue reference, then the
    reference attention. Tests use it to check the fused path's plumbing (what listeners see, which slots
    are written) apart from the kernels' numerics."""

    name = "torch-epilogue"
    fused_epilogue = True

    def qkv_epilogue(self, q, k, v, positions, inv_freq, slot_mapping, k_pool, v_pool):
        return qkv_epilogue_ref(q, k, v, positions, inv_freq, slot_mapping, k_pool, v_pool)

    def qkv_rotate_epilogue(self, q, k, v, positions, inv_freq, q_basis, k_basis, slot_mapping, k_pool, v_pool):
        return qkv_rotate_epilogue_ref(q, k, v, positions, inv_freq, q_basis, k_basis, slot_mapping, k_pool, v_pool)


class TritonBackend(AttentionBackend):
    """The Triton kernels (kernels/paged_decode.py, paged_prefill.py, qkv_epilogue.py, kv_quant.py).
    Imported on first use so that processes on the torch backend never import triton."""

    name = "triton"
    fused_epilogue = True
    fuses_projections = True
    fused_rope = True
    graph_safe = True
    # H200, bf16: SDPA ran 2.1x the prefill kernel at 4,096 tokens and 1.9x at 16,384; shorter prompts were not
    # measured, so they stay on the kernel until benchmarks/gpu_kernels.py's fresh-prefill rows say otherwise.
    fresh_prefill_min_tokens = 1024

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        k_scales=None, v_scales=None, max_q=None, plan=None):
        from zeroc_kernels.paged_decode import paged_decode_attention
        from zeroc_kernels.paged_prefill import paged_prefill_attention

        check_int8_args(k_cache, v_cache, k_scales, v_scales)
        if q.shape[0] == block_tables.shape[0]:  # one query per sequence: a decode-only step
            return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                          k_scales=k_scales, v_scales=v_scales)
        return paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                       k_scales=k_scales, v_scales=v_scales, max_q=max_q)

    def decode_partials(self, q, k_cache, v_cache, block_tables, seq_lens, scale, key_start=0):
        from zeroc_kernels.paged_decode import choose_num_splits, decode_partials

        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 0
        splits = choose_num_splits(q.shape[0], v_cache.shape[2], block_tables.shape[1], sms, v_cache.shape[1])
        return decode_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, splits, key_start=key_start)

    def tier_decode(self, q, pool, k_dim, slots, k_own, v_own, parts, lses, scale):
        from zeroc_kernels.tier_decode import tier_decode

        return tier_decode(q, pool, k_dim, slots, k_own, v_own, parts, lses, scale)

    def quantize_into_slots(self, x, slot_mapping, q_pool, scale_pool):
        from zeroc_kernels.kv_quant import quantize_into_slots

        quantize_into_slots(x, slot_mapping, q_pool, scale_pool)

    def qkv_epilogue(self, q, k, v, positions, inv_freq, slot_mapping, k_pool, v_pool):
        from zeroc_kernels.qkv_epilogue import qkv_epilogue

        return qkv_epilogue(q, k, v, positions, inv_freq, slot_mapping, k_pool, v_pool)

    def qkv_rotate_epilogue(self, q, k, v, positions, inv_freq, q_basis, k_basis, slot_mapping, k_pool, v_pool):
        from zeroc_kernels.qkv_epilogue import qkv_rotate_epilogue

        return qkv_rotate_epilogue(q, k, v, positions, inv_freq, q_basis, k_basis, slot_mapping, k_pool, v_pool)

    def rope(self, x, positions, inv_freq):
        from zeroc_kernels.qkv_epilogue import rope

        return rope_ref(x, positions, inv_freq) if _needs_grad(x) else rope(x, positions, inv_freq)

    def tier_qkv(self, q, k, v, q_tier, k_tier, v_tier, positions, inv_freq, tier_inv_freq):
        from zeroc_kernels.qkv_epilogue import tier_qkv

        fn = tier_qkv_ref if _needs_grad(q, k, v, q_tier, k_tier, v_tier) else tier_qkv
        return fn(q, k, v, q_tier, k_tier, v_tier, positions, inv_freq, tier_inv_freq)

    def rms_norm(self, x, weight, eps):
        from zeroc_kernels.layer_ops import rms_norm

        # The kernels have no backward: a forward that trains through this backend takes the reference.
        return rms_norm_ref(x, weight, eps) if _needs_grad(x, weight) else rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        from zeroc_kernels.layer_ops import add_rms_norm

        if _needs_grad(x, residual, weight):
            return add_rms_norm_ref(x, residual, weight, eps)
        return add_rms_norm(x, residual, weight, eps)

    def silu_mul(self, gate, up):
        from zeroc_kernels.layer_ops import silu_mul

        return silu_mul_ref(gate, up) if _needs_grad(gate, up) else silu_mul(gate, up)

    def apply_token_bitmask(self, scores, packed, r):
        from zeroc_kernels.token_bitmask import apply_token_bitmask

        apply_token_bitmask(scores, packed, r)


class FlexBackend(TritonBackend):
    """Triton with plain pools' paged attention by FlexAttention (kernels/flex_paged.py), compiled by Triton on CUDA
    with dynamic shapes, by C++ on the CPU with static ones (torch 2.13's CPU lowering builds no C++ for a prompt's
    dynamic shapes): a compile per new step shape there, so CI drives this backend; it is not for serving."""

    name = "flex"

    def __init__(self, dynamic: bool = True):
        from zeroc_kernels.flex_paged import compiled_flex

        self.dynamic, self.attend, self.flex = dynamic, compiled_flex(dynamic), True

    def plan(self, block_tables, seq_lens, query_start_loc, num_tokens, block_size, num_blocks, max_q):
        from zeroc_kernels.flex_paged import plan_flex_step

        if not self.flex:
            return None
        return plan_flex_step(block_tables, seq_lens, query_start_loc, num_tokens, block_size, num_blocks, max_q)

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        k_scales=None, v_scales=None, max_q=None, plan=None):
        from torch._dynamo.exc import FailOnRecompileLimitHit
        from zeroc_kernels.flex_paged import RECOMPILE_LIMIT, flex_paged_attention

        args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
        if self.flex and not check_int8_args(k_cache, v_cache, k_scales, v_scales):
            try:
                return flex_paged_attention(*args, max_q, self.attend, plan)
            except FailOnRecompileLimitHit:  # too many step shapes compiled: the Triton kernels from here on
                logger.warning("flex backend: %d step shapes compiled; the Triton kernels attend from here on",
                               RECOMPILE_LIMIT)
                self.flex = False
        return super().paged_attention(*args, k_scales, v_scales, max_q)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchBackend, "cpu": CpuBackend, "triton": TritonBackend,
                                                "flex": FlexBackend, "torch-epilogue": ReferenceEpilogueBackend}


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on `device`: compiled on CUDA, interpreted on the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def select_backend(name: str, device: torch.device | str, pack_weights: bool = True) -> AttentionBackend:
    """The backend `name` names for a model on `device`. "auto": Triton on CUDA when triton is installed,
    the ragged CPU kernel on the CPU where it builds, else the PyTorch references. `pack_weights`: the cpu
    backend's (CpuBackend). ValueError for an unknown name or a backend that cannot run there."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            try:
                return CpuBackend(pack_weights)
            except ValueError:  # no compiler here (logged): the references serve
                return TorchBackend()
        name = "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu attention backend runs on the CPU, not {device.type}")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name in ("triton", "flex") and not triton_runs_on(device):
        raise ValueError(f"the {name} attention backend cannot run on {device.type}: it needs CUDA, or "
                         "TRITON_INTERPRET=1 on the CPU (Triton's interpreter, slow: for tests), and triton "
                         "installed")
    if name == "flex":
        return FlexBackend(dynamic=device.type == "cuda")
    return CpuBackend(pack_weights) if name == "cpu" else BACKENDS[name]()
