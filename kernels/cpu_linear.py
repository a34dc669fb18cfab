"""The cpu backend's GEMMs: oneDNN on a packed copy of each fp32 or bf16 weight.

`CpuBackend.linear` (kernels/attention.py) runs here, for fp32 GEMMs, and bf16 ones where oneDNN runs bf16
(`PACKED_DTYPES`: AVX-512 or Arm CPUs with bf16), without gradients outside torch.compile (elsewhere F.linear
serves: inductor lowers the oneDNN op only for frozen weights). bf16 GEMMs of many rows on other CPUs (AVX2) run in
fp32 on the weight widened a slice at a time (`widened_bf16_linear`), where F.linear ran them a row at a time.

Packed. Given a `WeightPack` (the slot a `zeroc.layers.Linear` keeps beside its weight), the weight is reordered
once into oneDNN's blocked layout for a batch hint of `PACK_BATCH` rows, and every later call runs oneDNN's linear
op (`torch.ops.mkldnn._linear_pointwise`, which inductor uses on frozen weights) on that copy. oneDNN on a plain
weight reorders it on every call, which at decode batch sizes costs more than the product; MKL's sgemm (F.linear)
is slow at a few rows on AMD CPUs. On the 2-vCPU AMD EPYC the bundled model's LM head took 0.15 ms at 4 rows,
against 0.33 unpacked and 0.79 by F.linear (benchmarks/cpu_linear.py, docs/benchmarks.md). vLLM's CPU backend
packs the same way. bf16 packs too: Llama-3-8B's MLP weights at 4 rows took 3.8 ms packed against 5.8 by F.linear
(half of fp32's packed 7.9 ms).

Held once. The copy is as large as the weight. The services' models (an Engine or prefill worker with
`release_weights`, `Transformer.prepare_to_serve`) release their plain weights once packed (`WeightPack.release`):
the pack is then the weight's only copy, the Parameter an empty placeholder, as vLLM's CPU backend drops its
weights. Restoring them is exact (oneDNN's reorder back); `zeroc.model.Transformer` does it where the plain weights
are read (another backend, a move or cast, state_dict, a deep copy). Elsewhere a packed weight is held twice.

Every weight of a model packs, whatever its size, and every GEMM without gradients runs on its pack, served or
evaluated: a packed GEMM gives each row the same bits at any row count of 2 or more, and at 1 too where the input
is narrower than 2,048 (the bundled model's 384 and 1,024), so a sequence's decode logits there are the same bits
alone or batched (tests/kernels/test_cpu_linear.py). From 2,048 inputs up (Llama-3-8B's 4,096), oneDNN runs a lone
row with another kernel, whose last bits differ; run as two rows it would match, at 1-37% more time for that GEMM,
which decode at batch 1 does not pay. That lone-row kernel is also the one place packing loses: on the blocked
layout it takes 1.2-1.55x the plain layout's time at Llama-3-8B's shapes, where 4 rows take 0.7-0.9x
(docs/benchmarks.md, "Why fp32 packing loses at one row"); the layout serves batches. F.linear is not invariant
even there (a row alone and in a batch of 70 differ by some 3e-5), and where small weights stayed on F.linear, the
streaming evaluator (a token at a time) and the served prompt (70 at once) rounded differently enough to move a
KIVI cache's codes (2e-3 in the logits, tests/zeroc/policies/test_kivi.py).

Unpacked (no slot given: direct calls, benchmarks): oneDNN on the weight as it lies from `ONEDNN_MIN_WEIGHT`
elements, F.linear below, since oneDNN pays some 15 us a call and a small weight's reorder is cheap for MKL.

A pack goes stale when its weight changes. The slot checks, each call, that the weight still has the storage,
strides and version counter it was packed from (in-place writes, `.data =`, a new Parameter all change one), and
packs again if not; it keeps the packed-from tensor alive so that no other weight can take its address. An
inference tensor (made under torch.inference_mode, which a loaded model's weights are not) has no version counter:
it is packed afresh at each call and nothing is kept, so it computes the same bits as a weight packed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# torch's oneDNN linear op, in CPU builds with oneDNN (the x86 and aarch64 wheels)
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# torch's oneDNN weight reorder, which packs a weight for that op
ONEDNN_PACK = ONEDNN_LINEAR and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# without a pack slot, oneDNN runs a weight of at least this many elements, F.linear smaller ones
ONEDNN_MIN_WEIGHT = 1 << 18
# The batch the packed layout is chosen for. A hint of 1 keeps the plain layout; from 4 to 256 rows the layouts
# measured alike at every batch from 1 to 256 (the LM head at 4 rows: 0.15-0.19 ms for hints 4-256, 0.64 for 1).
PACK_BATCH = 32
# The weight dtypes that pack: fp32, and bf16 where oneDNN has bf16 kernels for this CPU (AVX-512 BW/VL/DQ, or Arm
# with bf16); fp16 and the rest run F.linear.
_BF16 = (ONEDNN_PACK and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
         and torch.ops.mkldnn._is_mkldnn_bf16_supported())
PACKED_DTYPES: tuple[torch.dtype, ...] = ((torch.float32, torch.bfloat16) if _BF16
                                          else (torch.float32,) if ONEDNN_PACK else ())
# bf16 GEMMs that do not pack (a CPU without bf16 instructions: AVX2) run F.linear, which there runs a row at a time
# (0.5 ms a row for the bundled model's LM head on a 2-vCPU AMD EPYC, 545 ms at 1,024 rows). From this many rows
# `widened_bf16_linear` serves them instead: 5-7x faster at 64 rows and up, level at 16, slower below.
WIDEN_MIN_ROWS = 16
# Weight elements widened to fp32 at a time: 2 MB of fp32, which stays in cache and is reused slice after slice
# (widening a large weight whole cost more in page faults than in conversion: 44 ms for 4096 x 4096).
WIDEN_SLICE = 1 << 19


class WeightPack:
    """A slot kept beside one weight by whoever owns it (`zeroc.layers.Linear`), in which the cpu backend keeps that
    weight packed for oneDNN. Empty until the first GEMM that packs; `clear` empties it (a Linear does when its
    module is moved or cast). A copy or a pickle of it starts empty and packs on its first use.

    Released (`release`, which serving calls through `Transformer.release_plain_weights`): the pack is the weight's
    only copy, and the weight's owner holds an empty placeholder in its place, so that a served model does not hold
    its weights twice. Every GEMM then runs on the pack; `restore` puts the plain weight back, the same bits
    (oneDNN's reorder back). A released pack is copied and pickled with its weight, which nothing else holds."""

    __slots__ = ("packed", "released", "_source", "_version")

    def __init__(self):
        self.released = False
        self.clear()

    def clear(self) -> None:
        if self.released:  # the weight's only copy: its owner restores it first (zeroc.layers.Linear._apply does)
            raise RuntimeError("this weight was released for serving and lives only in its pack: "
                               "restore it (Transformer.restore_plain_weights) before the pack is cleared")
        self.packed: Tensor | None = None
        self._source: Tensor | None = None  # the tensor packed from, kept alive so its address stays its own
        self._version = -1

    def get(self, weight: Tensor) -> Tensor:
        """weight: [out, in] fp32 -> its oneDNN-packed copy (opaque), packed again if the weight changed; released,
        the pack itself (`weight` is the placeholder)."""
        if self.released:
            return self.packed
        if not self._current(weight):
            self.packed = _pack(weight)
            self._source, self._version = weight.detach(), weight._version
        return self.packed

    def _current(self, weight: Tensor) -> bool:
        """Whether the pack was made from `weight` as it is now."""
        src = self._source
        return not (src is None or src.data_ptr() != weight.data_ptr() or self._version != weight._version
                    or src.shape != weight.shape or src.stride() != weight.stride())

    def release(self, weight: Tensor) -> bool:
        """weight: [out, in], the tensor this pack was made from. If the pack is a current copy of it, make the
        pack its only copy: `weight`'s data becomes an empty placeholder (its owner's views of it must be dropped
        too, `zeroc.fused_linears`). Returns whether it did: an empty or stale pack, or one already released,
        releases nothing."""
        if self.released or self.packed is None or not self._current(weight):
            return False
        drop_data(weight)
        self._source, self._version, self.released = None, -1, True
        return True

    def restore(self, weight: Tensor) -> None:
        """weight: the placeholder `release` left. Give it its plain data again, the same bits (oneDNN's reorder
        back to [out, in]); the pack is a current copy of it again, not repacked."""
        if not self.released:
            return
        with torch.inference_mode(False):  # a weight, not an inference tensor, whatever mode restores it
            weight.data = self.plain()
        self._source, self._version, self.released = weight.detach(), weight._version, False

    def __deepcopy__(self, memo: dict) -> "WeightPack":
        return _released(self.packed.clone()) if self.released else WeightPack()

    def __reduce__(self):
        # an opaque oneDNN tensor does not pickle: a released pack travels as its plain weight, packed on arrival
        return (_released_from_plain, (self.plain(),)) if self.released else (WeightPack, ())

    def plain(self) -> Tensor:
        """The packed weight as a new plain [out, in] tensor, the same bits (oneDNN's reorder back)."""
        return self.packed.to_dense()


def drop_data(weight: Tensor) -> None:
    """Leave `weight` an empty placeholder (its Parameter kept), its values held by a released pack."""
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)


def _released(packed: Tensor) -> WeightPack:
    """A released pack holding `packed` (opaque), the weight's only copy."""
    pack = WeightPack()
    pack.packed, pack.released = packed, True
    return pack


def _released_from_plain(weight: Tensor) -> WeightPack:
    """weight: [out, in] -> a released pack of it (an unpickled one)."""
    return _released(_pack(weight))


def _pack(weight: Tensor) -> Tensor:
    """weight: [out, in] fp32 or bf16 -> its copy in oneDNN's blocked layout for PACK_BATCH rows (an opaque mkldnn
    tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)


def prepack(weight: Tensor, pack: WeightPack) -> None:
    """weight: [out, in]. Pack it into `pack` now, where its GEMMs would (a CPU weight of `PACKED_DTYPES` that is
    not an inference tensor): an Engine does it before sizing its KV cache, so that a budget taken from the memory
    available sees the copies."""
    if weight.dtype in PACKED_DTYPES and weight.device.type == "cpu" and not weight.is_inference():
        pack.get(weight)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, pack: WeightPack | None = None) -> Tensor:
    """x: [*, in]; weight: [out, in]; bias: [out] or None -> x @ weight^T + bias [*, out]: by oneDNN on the weight
    packed in `pack` where one is given, else as the module docstring says."""
    if pack is not None and pack.released:
        return _released_linear(x, pack, bias)
    if not (ONEDNN_LINEAR and x.dtype == weight.dtype and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    if pack is not None and weight.dtype in PACKED_DTYPES:
        # an inference tensor (made under torch.inference_mode) has no version counter to tell a stale pack by: it
        # is packed afresh at each call, and nothing is kept (the same kernel, so the same bits as a kept pack)
        w = pack.get(weight) if not weight.is_inference() else _pack(weight)
    elif weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT:
        w = weight
    elif (weight.dtype == torch.bfloat16 and torch.bfloat16 not in PACKED_DTYPES  # no bf16 kernels here: widen
          and x.numel() >= WIDEN_MIN_ROWS * x.shape[-1]):
        return widened_bf16_linear(x, weight, bias)
    else:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, "none", [], "")


def widened_bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: [*, in] bf16; weight: [out, in] bf16; bias: [out] or None -> x @ weight^T + bias [*, out] bf16, computed in
    fp32 on WIDEN_SLICE weight elements widened at a time and rounded once, as a bf16 GEMM accumulates (fp32) and
    rounds: a CPU without bf16 instructions runs fp32 GEMMs at full speed and bf16 ones a row at a time."""
    rows = x.reshape(-1, x.shape[-1]).float()  # [R, in]
    out_features, in_features = weight.shape
    step = max(1, WIDEN_SLICE // in_features)  # output features a slice
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    scratch = torch.empty(rows.shape[0], min(step, out_features), device=x.device)  # [R, step] fp32, reused
    for start in range(0, out_features, step):
        stop = min(out_features, start + step)
        part, w = scratch[:, : stop - start], weight[start:stop].float()  # [R, n], [n, in]
        if bias is None:
            torch.mm(rows, w.t(), out=part)
        else:
            torch.addmm(bias[start:stop].float(), rows, w.t(), out=part)
        out[:, start:stop] = part  # rounded to bf16 once
    return out.view(*x.shape[:-1], out_features)


def _released_linear(x: Tensor, pack: WeightPack, bias: Tensor | None) -> Tensor:
    """x: [*, in] -> [*, out] on a released pack, the weight's only copy: where only the plain weight would do,
    a clear error rather than a GEMM on the placeholder."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dtype != pack.packed.dtype:
        raise RuntimeError(f"this GEMM's weight was released for serving (it lives only in its oneDNN pack), which "
                           f"runs {pack.packed.dtype} inputs without gradients outside torch.compile; got "
                           f"{x.dtype} inputs{' with gradients' if torch.is_grad_enabled() else ''}: restore the "
                           "plain weights first (Transformer.restore_plain_weights)")
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), pack.packed, bias, "none", [], "")
