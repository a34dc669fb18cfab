"""The model's building blocks whose work its attention backend does: a Linear whose GEMM the backend runs (and
may keep packed), an RMSNorm whose norm and residual add it may fuse, and an Embedding a meta skeleton can hold.
zeroc/model.py assembles them into the Llama forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zeroc_kernels.attention import AttentionBackend, TorchBackend
from zeroc_kernels.cpu_linear import WeightPack
from zeroc_kernels.layer_ops import add_rms_norm_ref, rms_norm_ref


class Linear(nn.Linear):
    """nn.Linear whose GEMM its model's backend runs (`AttentionBackend.linear`, oneDNN on the cpu backend): setting
    `Transformer.backend` hands it to every Linear of the model; before that, or outside a model, the torch
    backend's (F.linear). `pack` is the slot where the backend may keep the weight in its own layout (the cpu
    backend's packed oneDNN copy, made on first use and remade when the weight changes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.gemm = TorchBackend().linear
        self.pack = WeightPack()

    def forward(self, x: Tensor) -> Tensor:
        # x: [*, in] -> [*, out]
        return self.gemm(x, self.weight, self.bias, self.pack)

    def _apply(self, fn, recurse: bool = True):
        # moved or cast (.to, .half, ...): drop the packed copy now rather than hold the old weight until next use,
        # the plain weight back first where the pack was its only copy
        self.pack.restore(self.weight)
        self.pack.clear()
        return super()._apply(fn, recurse)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, ops: AttentionBackend | None = None) -> Tensor:
        # x: [*, hidden]. ops: the model's backend, which may fuse the norm into one kernel; None: the reference
        # (normalise in fp32, scale in the input dtype, as Hugging Face does, so half precision matches)
        return ops.rms_norm(x, self.weight, self.eps) if ops is not None else rms_norm_ref(x, self.weight, self.eps)

    def add(self, x: Tensor, residual: Tensor, ops: AttentionBackend | None = None) -> tuple[Tensor, Tensor]:
        # x, residual: [*, hidden] -> (norm(x + residual), x + residual): the residual add fused into the norm
        if ops is None:
            return add_rms_norm_ref(x, residual, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Embedding(nn.Embedding):
    """nn.Embedding that a meta skeleton holds without initialising."""

    def reset_parameters(self) -> None:
        # A meta skeleton (the loader's) has nothing to initialise, and normal_ on meta goes through PyTorch's
        # Python references, whose first use imports torch._dynamo: seconds of every service's start.
        if not self.weight.is_meta:
            super().reset_parameters()
