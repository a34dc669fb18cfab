"""The source model's next-token distributions on calibration windows, and how far a cut model's are from them.

Calibration measures each cut (one layer's Q/K or V at a lower rank) as KL(source || cut model) per predicted token
(calibrate.py, step 3). A cut changes one layer: its forward resumes there (`cut_kl`), from the source model's
hidden states entering that layer (`layer_inputs`), on the source model's own layers (and their packed weights)
after it. Only the cut attention is new, so a cut costs the layers from it on, not a whole model built and run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zeroc.attend import DenseCausal
from zeroc.model import Attention, Transformer
from zeroc.rope import RopeTables


@dataclass(frozen=True)
class Reference:
    """The source model's next-token distributions on the sensitivity windows."""

    windows: Tensor  # [n, T]
    positions: Tensor  # [n, T] each window at a random offset (see `offset_positions`)
    log_probs: list[Tensor]  # per batch of `batch` windows: [b, T - 1, vocab]
    loss: float  # the source model's mean NLL per predicted token
    batch: int

    def batches(self):
        for i, lp in enumerate(self.log_probs):
            rows = slice(i * self.batch, (i + 1) * self.batch)
            yield self.windows[rows], self.positions[rows], lp


def offset_positions(windows: Tensor, max_positions: int, seed: int) -> Tensor:
    """Positions [n, T] of each window shifted by a random offset in [0, max_positions - T].

    Attention depends only on relative positions, so the model's outputs do not change, but post-RoPE
    q and k are seen at every absolute position a served sequence can reach: rotate-mode bases fitted
    on positions < T alone drop directions that longer contexts rotate into (measured: +7% perplexity
    at context 2048 from bases fitted on windows of 512 without offsets, +0.4% with them).
    """
    span = max(1, max_positions - windows.shape[1] + 1)
    offsets = torch.randint(0, span, (windows.shape[0], 1), generator=torch.Generator().manual_seed(seed))
    return torch.arange(windows.shape[1]) + offsets


@torch.inference_mode()
def _log_probs(model: Transformer, windows: Tensor, positions: Tensor) -> Tensor:
    # windows, positions: [b, T] -> [b, T - 1, vocab] log-probabilities of each next token
    logits = model.forward_attend(windows[:, :-1], positions[:, :-1], DenseCausal())
    return F.log_softmax(logits.float(), dim=-1)


def _nll(log_probs: Tensor, windows: Tensor) -> float:
    return -log_probs.gather(-1, windows[:, 1:, None]).sum().item()


def reference(model: Transformer, windows: Tensor, batch: int = 4, seed: int = 1) -> Reference:
    positions = offset_positions(windows, model.config.max_position_embeddings, seed).to(windows.device)
    lps = [_log_probs(model, windows[i: i + batch], positions[i: i + batch]) for i in range(0, windows.shape[0], batch)]
    nll = sum(_nll(lp, windows[i * batch: (i + 1) * batch]) for i, lp in enumerate(lps))
    return Reference(windows, positions, lps, nll / (windows.shape[0] * (windows.shape[1] - 1)), batch)


def _kl_sum(src: Tensor, lp: Tensor) -> float:
    # src, lp: [b, T - 1, vocab] log-probabilities of the source and of a cut model -> summed KL(source || cut)
    return (src.exp() * (src - lp)).sum().item()


def divergence(model: Transformer, ref: Reference) -> tuple[float, float]:
    """-> (mean KL(source || model) per predicted token, mean NLL of `model`) on the reference windows."""
    kl = nll = 0.0
    for w, pos, src in ref.batches():
        lp = _log_probs(model, w, pos)
        kl += _kl_sum(src, lp)
        nll += _nll(lp, w)
    count = ref.windows.shape[0] * (ref.windows.shape[1] - 1)
    return kl / count, nll / count


@torch.inference_mode()
def layer_inputs(model: Transformer, ref: Reference, index: int) -> list[tuple[Tensor, Tensor | None]]:
    """Per reference batch, the source model's (x, residual) entering layer `index`, [b, T - 1, hidden] each
    (residual None at layer 0: the embeddings alone)."""
    out = []
    for w, pos, _ in ref.batches():
        x, residual, rope = model.model.embed_tokens(w[:, :-1]), None, RopeTables(pos[:, :-1], model.backend)
        for layer in model.model.layers[:index]:
            x, residual = layer.forward_residual(x, residual, rope, DenseCausal(), model.backend)
        out.append((x, residual))
    return out


@torch.inference_mode()
def cut_kl(model: Transformer, ref: Reference, index: int, attn: Attention,
           inputs: list[tuple[Tensor, Tensor | None]]) -> float:
    """Mean KL(source || the source with layer `index`'s attention replaced by `attn`) per predicted token, the
    forward resumed at that layer from `inputs` (`layer_inputs`): the layers before it are the source's."""
    layers = model.model.layers
    run = [layers[index].with_attention(attn), *layers[index + 1:]]
    kl = 0.0
    for (x, residual), (_, pos, src) in zip(inputs, ref.batches()):
        logits = model.lm_head(model.run_layers(x, residual, pos[:, :-1], DenseCausal(), run))
        kl += _kl_sum(src, F.log_softmax(logits.float(), dim=-1))
    return kl / (ref.windows.shape[0] * (ref.windows.shape[1] - 1))
