"""The cpu backend's GEMMs: oneDNN on a packed copy of each fp32 or bf16 weight.

`CpuBackend.linear` (kernels/attention.py) runs here, for fp32 GEMMs, and bf16 ones where oneDNN runs bf16
(`PACKED_DTYPES`: AVX-512 or Arm CPUs with bf16), without gradients outside torch.compile (elsewhere F.linear
serves: inductor lowers the oneDNN op only for frozen weights).

Packed. Given a `WeightPack` (the slot a `zeroc.model.Linear` keeps beside its weight), the weight is reordered
once into oneDNN's blocked layout for a batch hint of `PACK_BATCH` rows, and every later call runs oneDNN's linear
op (`torch.ops.mkldnn._linear_pointwise`, which inductor uses on frozen weights) on that copy. oneDNN on a plain
weight reorders it on every call, which at decode batch sizes costs more than the product; MKL's sgemm (F.linear)
is slow at a few rows on AMD CPUs. On the 2-vCPU AMD EPYC the bundled model's LM head took 0.15 ms at 4 rows,
against 0.33 unpacked and 0.79 by F.linear (benchmarks/cpu_linear.py, docs/benchmarks.md). vLLM's CPU backend
packs the same way. The copy is as large as the weight: the cpu backend holds its weights twice. bf16 packs too:
Llama-3-8B's MLP weights at 4 rows took 3.8 ms packed against 5.8 by F.linear (half of fp32's packed 7.9 ms).

Every weight of a model packs, whatever its size: a packed GEMM gives each row the same bits at any row count of 2
or more, and at 1 too where the input is narrower than 2,048 (the bundled model's 384 and 1,024), so a sequence's
decode logits there are the same bits alone or batched (tests/kernels/test_cpu_linear.py). From 2,048 inputs up
(Llama-3-8B's 4,096), oneDNN runs a lone row with another kernel, whose last bits differ; run as two rows it would
match, at 1-37% more time for that GEMM, which decode at batch 1 does not pay. There, too, a lone fp32 row of a
weight of `PLAIN_ROW_MIN_WEIGHT` elements or more runs on the plain weight: oneDNN's GEMV reads it faster than the
packed layout, 0.72-0.88x the time from 8M elements on the AMD EPYC (docs/benchmarks.md). F.linear is not
invariant even there (a row alone and in a batch of 70 differ by some 3e-5), and where small weights stayed on
F.linear, the streaming evaluator (a token at a time) and the served prompt (70 at once) rounded differently
enough to move a KIVI cache's codes (2e-3 in the logits, tests/zeroc/policies/test_kivi.py).

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
# A lone fp32 row of a weight this large, and at least PLAIN_ROW_MIN_IN wide (where a lone row's bits differ from a
# batch's anyway), runs on the plain weight
PLAIN_ROW_MIN_WEIGHT = 1 << 23
PLAIN_ROW_MIN_IN = 2048
# The weight dtypes that pack: fp32, and bf16 where oneDNN has bf16 kernels for this CPU (AVX-512 BW/VL/DQ, or Arm
# with bf16); fp16 and the rest run F.linear.
_BF16 = (ONEDNN_PACK and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
         and torch.ops.mkldnn._is_mkldnn_bf16_supported())
PACKED_DTYPES: tuple[torch.dtype, ...] = ((torch.float32, torch.bfloat16) if _BF16
                                          else (torch.float32,) if ONEDNN_PACK else ())


class WeightPack:
    """A slot kept beside one weight by whoever owns it (`zeroc.model.Linear`), in which the cpu backend keeps that
    weight packed for oneDNN. Empty until the first GEMM that packs; `clear` empties it (a Linear does when its
    module is moved or cast). Never copied, pickled or saved: a copy starts empty and packs on its first use."""

    __slots__ = ("packed", "_source", "_version")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.packed: Tensor | None = None
        self._source: Tensor | None = None  # the tensor packed from, kept alive so its address stays its own
        self._version = -1

    def get(self, weight: Tensor) -> Tensor:
        """weight: [out, in] fp32 -> its oneDNN-packed copy (opaque), packed again if the weight changed."""
        src = self._source
        if (src is None or src.data_ptr() != weight.data_ptr() or self._version != weight._version
                or src.shape != weight.shape or src.stride() != weight.stride()):
            self.packed = _pack(weight)
            self._source, self._version = weight.detach(), weight._version
        return self.packed

    def __deepcopy__(self, memo: dict) -> "WeightPack":
        return WeightPack()

    def __reduce__(self):
        return WeightPack, ()


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
    if not (ONEDNN_LINEAR and x.dtype == weight.dtype and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    if pack is not None and weight.dtype in PACKED_DTYPES and not _plain_row(x, weight):
        # an inference tensor (made under torch.inference_mode) has no version counter to tell a stale pack by: it
        # is packed afresh at each call, and nothing is kept (the same kernel, so the same bits as a kept pack)
        w = pack.get(weight) if not weight.is_inference() else _pack(weight)
    elif weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT:  # a plain row lands here too
        w = weight
    else:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, "none", [], "")


def _plain_row(x: Tensor, weight: Tensor) -> bool:
    """x: [*, in]; weight: [out, in]. Whether x is one fp32 row that runs faster on the plain weight (module
    docstring)."""
    return (weight.dtype == torch.float32 and x.numel() == weight.shape[1] >= PLAIN_ROW_MIN_IN
            and weight.numel() >= PLAIN_ROW_MIN_WEIGHT)
