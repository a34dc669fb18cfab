"""Several nn.Linear as one GEMM: of one input (a layer's Q/K/V projections, its MLP's gate and up), or of one
output width whose outputs are added (a token tier's two output projections).

At decode batch sizes a projection's GEMM is bound by reading its weight, and each is a launch of its own;
a narrow one (K or V: 1,024 of Llama-3-8B's 4,096 rows) runs well under the copy rate. `FusedLinears.of`
concatenates the weights once and re-points each nn.Linear's weight (and bias) at its rows of the
concatenation, so nothing is stored twice and checkpoints keep Hugging Face's names; weights loaded into a
part in place (`load_state_dict`, an optimizer step) land in the concatenation too.

`SummedLinears` is the transpose case: o_proj(a) + tier_o_proj(b) = [W_o | W_tier_o] [a; b], the weights laid
side by side along their input dims (each part's weight a column view of the concatenation), the inputs
concatenated per call (a copy of the activations, not of the weights).

The one GEMM serves forwards without gradients (serving, evaluation). Where gradients are wanted, or once a
part's weight is no longer its rows of the concatenation (the module was moved or cast after fusing, or a
weight reassigned: `fresh` is False), each part runs on its own, so the result is always the parts' own, until
`Transformer.fuse_projections` fuses them again. A deep copy is fused afresh: the copied parts' weights (which
nn.Parameter's deep copy clones apart) are concatenated again and re-pointed, so a copy runs one GEMM too and
holds its weights once.

A served model holds each weight once (`Transformer.release_plain_weights`): where the backend packed the
concatenation, `release` makes the pack its only copy and leaves the concatenation and the parts' views empty
placeholders; `restore` gives them back, the same bits, the parts re-pointed at their slices. A part that was served
on its own and released is restored before it is fused.

The one GEMM is the parts' backend's: a part that is a `zeroc.layers.Linear` carries its model's backend GEMM
(`gemm`), which the fused call runs on the concatenation with a pack slot of its own (the cpu backend packs the
concatenation for oneDNN, kernels/cpu_linear.py); a plain nn.Linear part, F.linear.
"""

from __future__ import annotations

import copy
import ctypes
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroc_kernels.cpu_linear import WeightPack, drop_data


@dataclass(eq=False)
class FusedLinears:
    parts: tuple[nn.Linear, ...]
    weight: Tensor  # [Σ out, in]: the parts' weights, one after another
    bias: Tensor | None  # [Σ out]
    sizes: tuple[int, ...]  # each part's out_features
    pointers: tuple[int, ...]  # each part's weight's and bias's addresses inside the two, to see one replaced
    pack: WeightPack = field(default_factory=WeightPack)  # where the backend may keep `weight` in its own layout
    DIM = 0  # the parts' weights lie along the concatenation's rows

    @classmethod
    @torch.inference_mode(False)  # the weights stay weights, not inference tensors, fused under inference_mode too
    def of(cls, *parts: nn.Linear) -> FusedLinears | None:
        """Fuse `parts` (one in_features, one dtype and device, all with a bias or none); None where they
        cannot be (a meta skeleton not loaded yet)."""
        if len({p.bias is None for p in parts}) > 1 or len({p.in_features for p in parts}) > 1:
            raise ValueError("fused linears need one input width and a bias on all or none of them")
        if any(p.weight.is_meta for p in parts):
            return None
        _restore_own(parts)
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts])
            bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        at = 0
        for p in parts:
            rows = slice(at, at + p.out_features)
            p.weight = nn.Parameter(weight[rows], requires_grad=p.weight.requires_grad)  # a view: no copy
            if bias is not None:
                p.bias = nn.Parameter(bias[rows], requires_grad=p.bias.requires_grad)
            at += p.out_features
        return cls(tuple(parts), weight, bias, tuple(p.out_features for p in parts), _pointers(parts))

    @property
    def fresh(self) -> bool:
        """Whether every part's weight and bias still are their rows of the concatenation."""
        return _pointers(self.parts) == self.pointers

    def __deepcopy__(self, memo: dict) -> FusedLinears | None:
        return type(self).of(*copy.deepcopy(self.parts, memo))

    def release(self) -> None:
        """Serving: if the backend holds the concatenation packed (`pack`), make the pack its only copy, and drop
        the parts' views of it (each keeps an empty placeholder), so that the weights are held once
        (`Transformer.release_plain_weights`)."""
        if self.pack.release(self.weight):
            for p in self.parts:
                drop_data(p.weight)
            self.pointers = _pointers(self.parts)

    def plain_part(self, part: nn.Linear) -> Tensor:
        """part (one of `parts`)'s weight as values: its view, or where released, a copy from the pack."""
        whole = self.pack.plain() if self.pack.released else self.weight
        return whole.split(self.sizes, self.DIM)[next(i for i, p in enumerate(self.parts) if p is part)]

    def restore(self) -> None:
        """Undo `release`: the concatenation back from the pack, the same bits, and each part's weight its view
        of it again."""
        if self.pack.released:
            self.pack.restore(self.weight)
            _repoint(self.parts, self.weight, self.DIM, self.sizes)
            self.pointers = _pointers(self.parts)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: [*, in] -> each part's output [*, out_i]: column views of one GEMM's output."""
        if torch.is_grad_enabled() or not self.fresh:
            return tuple(p(x) for p in self.parts)
        return _gemm(self.parts, x, self.weight, self.bias, self.pack).split(self.sizes, -1)


def _gemm(parts: tuple[nn.Linear, ...], x: Tensor, weight: Tensor, bias: Tensor | None, pack: WeightPack) -> Tensor:
    """x: [*, in]; weight: [out, in] -> [*, out] by the parts' backend GEMM (the first part's `gemm`, which setting
    `Transformer.backend` hands every Linear), read at each call so that a later backend is the one that runs."""
    gemm = getattr(parts[0], "gemm", None)
    return gemm(x, weight, bias, pack) if gemm is not None else F.linear(x, weight, bias)


def _restore_own(parts: tuple[nn.Linear, ...]) -> None:
    """A part served on its own before, whose pack became its weight's only copy (WeightPack.release), gets its
    plain weight back: the concatenation is made of the plain weights. Its own pack is then emptied: the fused GEMM
    has its own, and a kept one would hold the part's old weight alive beside the concatenation."""
    for p in parts:
        pack = getattr(p, "pack", None)
        if isinstance(pack, WeightPack):
            pack.restore(p.weight)
            pack.clear()


def _repoint(parts: tuple[nn.Linear, ...], weight: Tensor, dim: int, sizes: tuple[int, ...]) -> None:
    """Each part's weight (the same Parameter) its slice of `weight` along `dim`: rows (0) or columns (1)."""
    for p, part in zip(parts, weight.split(sizes, dim)):
        p.weight.data = part


def _pointers(parts: tuple[nn.Linear, ...]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for p in parts for t in (p.weight, p.bias) if t is not None)


@dataclass(eq=False)
class SummedLinears:
    parts: tuple[nn.Linear, ...]
    weight: Tensor  # [out, Σ in]: the parts' weights side by side
    bias: Tensor | None  # [out]: the one part's that has a bias
    sizes: tuple[int, ...]  # each part's in_features
    pointers: tuple[int, ...]
    pack: WeightPack = field(default_factory=WeightPack)
    DIM = 1  # side by side, along its columns

    @classmethod
    @torch.inference_mode(False)  # as FusedLinears.of
    def of(cls, *parts: nn.Linear) -> SummedLinears | None:
        """Fuse `parts` (one out_features, one dtype and device, at most one with a bias: a sum of biases would
        not follow a part's later loads); None where they cannot be (a meta skeleton not loaded yet)."""
        if len({p.out_features for p in parts}) > 1 or sum(p.bias is not None for p in parts) > 1:
            raise ValueError("summed linears need one output width and at most one bias")
        if any(p.weight.is_meta for p in parts):
            return None
        _restore_own(parts)
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts], 1)
        at = 0
        for p in parts:
            # a column view (row stride Σ in): BLAS reads it in place where a part runs on its own
            p.weight = nn.Parameter(weight[:, at: at + p.in_features], requires_grad=p.weight.requires_grad)
            at += p.in_features
        bias = next((p.bias for p in parts if p.bias is not None), None)
        return cls(tuple(parts), weight, bias, tuple(p.in_features for p in parts), _pointers(parts))

    fresh = FusedLinears.fresh
    __deepcopy__ = FusedLinears.__deepcopy__
    release = FusedLinears.release
    plain_part = FusedLinears.plain_part
    restore = FusedLinears.restore

    def __call__(self, *xs: Tensor) -> Tensor:
        """xs: one [*, in_i] per part -> Σ_i part_i(x_i) [*, out]"""
        if torch.is_grad_enabled() or not self.fresh:
            return functools.reduce(torch.add, (p(x) for p, x in zip(self.parts, xs)))
        return _gemm(self.parts, torch.cat(xs, -1), self.weight, self.bias, self.pack)


# -- GEMM weights held once: the Linears a model serves on their own (zeroc.layers.Linear: a weight, a `pack`) and its
# fused groups, for `Transformer.release_plain_weights` and its inverse

def release_gemms(gemms: list, keep: Tensor) -> None:
    """Release every GEMM's plain weight that its pack holds (WeightPack.release; a group's `release`), but `keep`
    (a tied LM head's, which the embedding reads), and give the freed pages back to the OS."""
    for gemm in gemms:
        if isinstance(gemm, (FusedLinears, SummedLinears)):
            gemm.release()
        elif gemm.weight is not keep:
            gemm.pack.release(gemm.weight)
    return_freed_heap()


def return_freed_heap() -> None:
    """glibc keeps freed heap chunks for reuse, so memory freed by releasing weights would stay resident: for the
    bundled model 12 of its 48 MB of plain weights did (benchmarks/cpu_linear.py's memory row). malloc_trim hands
    those pages back. Elsewhere than glibc (musl, macOS), nothing."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def restore_gemms(gemms: list) -> bool:
    """Undo `release_gemms`. Returns whether any weight was released."""
    released = any(g.pack.released for g in gemms)
    for gemm in gemms:
        if isinstance(gemm, (FusedLinears, SummedLinears)):
            gemm.restore()
        else:
            gemm.pack.restore(gemm.weight)
    return released


def plain_weight(linear: nn.Linear, groups: list) -> Tensor:
    """linear's weight [out, in] as values: the Parameter, or where released, a copy from its own pack or its
    group's (`groups`: the model's fused GEMMs). The model stays released."""
    pack = getattr(linear, "pack", None)
    if isinstance(pack, WeightPack) and pack.released:
        return pack.plain()
    group = next((f for f in groups if any(p is linear for p in f.parts)), None)
    return group.plain_part(linear) if group is not None else linear.weight
