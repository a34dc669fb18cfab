"""Calibration that scales with the model: layer by layer, a local sensitivity proxy, bounded passes, resumable.

The full-KL sensitivity of calibrate.py runs one pass per cut (from the cut layer on): layers x KV heads x (Q/K
modes + 1) x candidate ranks, 5376 passes for a Llama-3-8B shape. Here (`sensitivity="local"`):

1. Layer by layer. The calibration windows' hidden states stay on the model's device; each layer in turn
   records its statistics (the moments of calibrate.py, float64), fits its factors and measures its cuts,
   then advances the hidden states: the working set is one layer's activations, not the model's.
2. Local cost of a cut: the mean squared error it adds to the layer's attention output (after W_o, the
   residual-stream update) on the sensitivity windows, every other layer whole. That is what the next layers
   see of the cut, but not how much they amplify it, so:
3. Per layer two full-model KL passes (all its KV heads' Q/K cut to half rank; all its V cut to half rank)
   turn the local errors into KL: cost(cut) = local(cut) x KL(reference cut) / local(reference cut), for Q/K
   and V cuts separately. `max_passes` / `time_budget` bound these passes; they are spent on layers in
   bisection order (first, last, middle, quarters, ...) and an unmeasured layer takes the scale of the
   nearest measured one (no passes at all: unscaled local errors).
4. Allocation and folding as before (calibrate.compress).

A checkpoint (torch.save, replaced atomically after every layer and every KL pass) holds the factors, costs,
scales and hidden states so far; a calibration started again with the same checkpoint path, model, text and
method resumes where it stopped and ends with the same result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from zeroc.attend import CallerAttend, DenseCausal, causal_attend
from zeroc.compression.calibrate import (CalibrationReport, Measurements, Moments, ZeroCMethod, _windows, compress,
                                         cut_compression, layer_cuts, layer_factors, measure)
from zeroc.compression.divergence import cut_kl, layer_inputs, offset_positions, reference
from zeroc.compression.fold import LayerFactors, cut_attention
from zeroc.config import ModelConfig, ZeroCError
from zeroc.data import read_eval_tokens
from zeroc.loader import LoadedModel
from zeroc.model import Attention, Transformer
from zeroc.rope import RopeTables

AUTO_KL_PASSES = 512  # "auto" measures full KL per cut up to this many passes
BATCH = 4  # windows through a layer at once
KL_FLOOR = 1e-9  # nats per token: below the float noise of a KL summed over a vocabulary


def full_kl_passes(cfg: ModelConfig, method: ZeroCMethod) -> int:
    """Full-model passes the "kl" sensitivity runs (calibrate.measure_sensitivity)."""
    cands = [r for r in method.candidate_ranks(cfg.head_dim) if r < cfg.head_dim]
    heads = cfg.num_key_value_heads if method.granularity == "head" else 1
    return cfg.num_hidden_layers * heads * (len(method.qk_modes) + 1) * len(cands)


def resolve_sensitivity(cfg: ModelConfig, method: ZeroCMethod) -> str:
    if method.sensitivity != "auto":
        return method.sensitivity
    limit = AUTO_KL_PASSES if method.max_passes is None else method.max_passes
    return "kl" if full_kl_passes(cfg, method) <= limit else "local"


def _attend_out(attn: Attention, index: int, normed: Tensor, positions: Tensor) -> Tensor:
    # normed: [n, T, hidden] the layer's normalised inputs -> attention outputs after W_o [n, T, hidden]
    return torch.cat([attn(index, normed[i: i + BATCH], RopeTables(positions[i: i + BATCH]), DenseCausal())
                      for i in range(0, normed.shape[0], BATCH)])


def _local_error(out: Tensor, base: Tensor) -> float:
    return (out.float() - base.float()).pow(2).sum(-1).mean().item()


def _reference_rank(cfg: ModelConfig, method: ZeroCMethod) -> int:
    """The rank of the per-layer KL reference cuts: the candidate nearest half the head dim."""
    cands = [r for r in method.candidate_ranks(cfg.head_dim) if r < cfg.head_dim]
    return min(cands, key=lambda r: abs(r - cfg.head_dim / 2))


def bisection_order(n: int) -> list[int]:
    """0, n-1, then midpoints of ever finer gaps: any prefix spreads over the range."""
    order, seen, gaps = [], set(), [(0, n - 1)]
    for i in (0, n - 1):
        if i not in seen:
            order.append(i)
            seen.add(i)
    while gaps:
        nxt = []
        for lo, hi in gaps:
            mid = (lo + hi) // 2
            if mid not in seen:
                order.append(mid)
                seen.add(mid)
            if mid - lo > 1:
                nxt.append((lo, mid))
            if hi - mid > 1:
                nxt.append((mid, hi))
        gaps = nxt
    return order + [i for i in range(n) if i not in seen]


class Checkpoint:
    """Where an interrupted calibration resumes: one torch.save file, written atomically; `key` ties it to the
    model files, calibration tokens and method (a mismatching file is ignored and overwritten)."""

    def __init__(self, path: str | Path | None, key: str):
        self.path, self.key = (Path(path) if path else None), key

    def load(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        return state if state.get("key") == self.key else {}

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)


def checkpoint_key(loaded: LoadedModel, method: ZeroCMethod, tokens: Tensor) -> str:
    """Model files (names, sizes, mtimes: hashing 15-150 GB is too slow), method and tokens -> hex digest."""
    h = hashlib.sha256()
    for f in sorted(loaded.path.glob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    params = {k: v for k, v in asdict(method).items() if k not in ("budget", "max_passes", "time_budget")}
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()[:24]


def _to(f: LayerFactors, device) -> LayerFactors:
    return LayerFactors(**{k: v.to(device) for k, v in f.__dict__.items()})


def _layer_statistics(layer, cfg: ModelConfig, x: Tensor, positions: Tensor, sample_windows: int) -> LayerFactors:
    """Run `layer` over x [n, T, hidden] in place (x becomes its output) recording its moments -> its factors."""
    moments = Moments(cfg.num_key_value_heads, cfg.group_size, cfg.head_dim, sample_windows)

    def attend(index: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        moments.add(q, k, v)
        return causal_attend(index, q, k, v, scale)

    for i in range(0, x.shape[0], BATCH):
        x[i: i + BATCH] = layer(x[i: i + BATCH], RopeTables(positions[i: i + BATCH]), CallerAttend(attend))
    return layer_factors(layer.self_attn, cfg, moments.stats(x.shape[0] * x.shape[1]))


def _local_costs(layer, cfg: ModelConfig, method: ZeroCMethod, factors: LayerFactors, xs: Tensor,
                 positions: Tensor) -> tuple[dict[tuple, float], dict[str, float]]:
    """Attention-output error of every cut of this layer on xs [n, T, hidden] -> ({(kind, rank, *head): error},
    {"qk" | "v": error of the reference cut})."""
    index, attn = layer.index, layer.self_attn
    normed = layer.input_layernorm(xs)
    base = _attend_out(attn, index, normed, positions)
    error = lambda comp: _local_error(_attend_out(cut_attention(attn, cfg, index, factors, comp), index,  # noqa: E731
                                                  normed, positions), base)
    local = {cut: error(cut_compression(cfg, factors, *cut)) for cut in layer_cuts(cfg, method)}
    r = _reference_rank(cfg, method)
    refs = {"qk": error(cut_compression(cfg, factors, method.qk_modes[0], r)),
            "v": error(cut_compression(cfg, factors, "v", r))}
    return local, refs


def _advance(layer, xs: Tensor, positions: Tensor) -> Tensor:
    for i in range(0, xs.shape[0], BATCH):
        xs[i: i + BATCH] = layer(xs[i: i + BATCH], RopeTables(positions[i: i + BATCH]), DenseCausal())
    return xs


def _kl_passes(model: Transformer, method: ZeroCMethod, factors: list[LayerFactors], ref, state: dict,
               ckpt: Checkpoint, started: float, progress: bool) -> None:
    """Full-model KL of each layer's reference cuts, in bisection order, within max_passes and time_budget."""
    cfg = model.config
    r = _reference_rank(cfg, method)
    order = [(i, kind) for i in bisection_order(cfg.num_hidden_layers) for kind in ("qk", "v")]
    order = order[: len(order) if method.max_passes is None else method.max_passes]
    inputs = {}
    for i, kind in tqdm(order, desc="calibrate: KL passes", disable=not progress):
        if (i, kind) in state["kl"]:
            continue
        if method.time_budget is not None and time.monotonic() - started > method.time_budget:
            break
        if i not in inputs:  # a layer's two passes are adjacent: its inputs run once for both
            inputs = {i: layer_inputs(model, ref, i)}
        comp = cut_compression(cfg, factors[i], method.qk_modes[0] if kind == "qk" else "v", r)
        attn = cut_attention(model.model.layers[i].self_attn, cfg, i, factors[i], comp)
        state["kl"][(i, kind)] = cut_kl(model, ref, i, attn, inputs[i])
        ckpt.save(state)


def scales(state: dict, num_layers: int) -> dict[tuple[int, str], float]:
    """KL per unit of local error, per layer and "qk" | "v": measured, else the nearest measured layer's
    (lower on ties), else 1."""
    out = {}
    for kind in ("qk", "v"):
        # a reference cut's KL below KL_FLOOR is float noise (it can even come out negative): floored, the layer's
        # cuts stay cheap but keep the order of their local errors
        measured = {i: max(kl, KL_FLOOR) / max(state["ref_local"][(i, kind)], 1e-30)
                    for (i, k), kl in state["kl"].items() if k == kind}
        for i in range(num_layers):
            near = min(measured, key=lambda j: (abs(j - i), j)) if measured else None
            out[(i, kind)] = 1.0 if near is None else measured[near]
    return out


@torch.inference_mode()
def measure_local(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod, progress: bool = True,
                  checkpoint: str | Path | None = None, on_layer: Callable[[int], None] | None = None) -> Measurements:
    """calibrate.measure with the layer-local sensitivity (module docstring). `on_layer(i)` runs after layer i's
    checkpoint is written."""
    started = time.monotonic()
    model, cfg = loaded.model, loaded.config
    if cfg.compression is not None:
        raise ZeroCError(f"{loaded.path}: model is already compressed (fingerprint {cfg.compression.fingerprint})")
    method.candidate_ranks(cfg.head_dim)  # validates rank_multiple against this model
    tokens = read_eval_tokens(loaded.tokenizer, calib_file)
    device = next(model.parameters()).device
    windows = _windows(tokens, method.window, method.calib_tokens).to(device)
    ref = reference(model, _windows(tokens, method.window, method.sensitivity_tokens).to(device))
    positions = offset_positions(windows, cfg.max_position_embeddings, 0).to(device)
    ckpt = Checkpoint(checkpoint, checkpoint_key(loaded, method, tokens))
    state = ckpt.load() or {"done": 0, "factors": [], "local": {}, "ref_local": {}, "kl": {}}
    if state["done"]:
        x, xs = state["x"].to(device), state["xs"].to(device)
    else:
        x, xs = model.model.embed_tokens(windows), model.model.embed_tokens(ref.windows)
    factors = [_to(f, device) for f in state["factors"]]
    sample_windows = -(-method.ablation_tokens // method.window) if "fold" in method.qk_modes else 0
    layers = model.model.layers
    for i in tqdm(range(state["done"], len(layers)), desc="calibrate: layers", initial=state["done"],
                  total=len(layers), disable=not progress):
        factors.append(_layer_statistics(layers[i], cfg, x, positions, sample_windows))
        local, refs = _local_costs(layers[i], cfg, method, factors[i], xs, ref.positions)
        state["local"].update({(i, *job): e for job, e in local.items()})
        state["ref_local"].update({(i, kind): e for kind, e in refs.items()})
        xs = _advance(layers[i], xs, ref.positions)
        state["done"] = i + 1
        if ckpt.path is not None:  # host copies only where they are saved
            state.update(factors=[_to(f, "cpu") for f in factors], x=x.cpu(), xs=xs.cpu())
            ckpt.save(state)
        if on_layer is not None:
            on_layer(i)
    _kl_passes(model, method, factors, ref, state, ckpt, started, progress)
    scale = scales(state, len(layers))
    deltas = {key: scale[(key[0], "v" if key[1] == "v" else "qk")] * e for key, e in state["local"].items()}
    return Measurements(tokens, factors, ref, deltas, method.qk_modes, method.granularity, "local")


def measure_any(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod, progress: bool = True,
                checkpoint: str | Path | None = None) -> Measurements:
    """Steps 1-3 with the sensitivity `method` asks for (`resolve_sensitivity`)."""
    if resolve_sensitivity(loaded.config, method) == "local":
        return measure_local(loaded, calib_file, method, progress, checkpoint)
    need = full_kl_passes(loaded.config, method)
    if method.max_passes is not None and need > method.max_passes:
        raise ValueError(f"sensitivity kl needs {need} full-model passes, more than max_passes {method.max_passes}; "
                         "use sensitivity local or auto")
    return measure(loaded, calib_file, method, progress)


def calibrate_model(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod, progress: bool = True,
                    checkpoint: str | Path | None = None) -> tuple[Transformer, CalibrationReport]:
    """Compress `loaded` with `method` on the text in `calib_file`, resuming from `checkpoint` if one matches."""
    return compress(loaded, measure_any(loaded, calib_file, method, progress, checkpoint), method)
