"""`zeroc calibrate`: fit the ZeroC bases on calibration text, choose ranks, fold, save.

1. Statistics: one pass over the calibration windows records, per layer, E[q^2] and E[k^2] per
   dim (for RoPE pair ranking) and E[v v^T] per KV head (for the whitened PCA of V/O).
2. Factors: rank-ordered pairs and V/O bases per KV head (`fold.py`); any rank is a prefix.
3. Sensitivity: the calibration loss measured with one layer's Q/K (or V) cut to each candidate
   rank, everything else whole.
4. Allocation: per-layer (qk_rank, v_rank) minimising the summed loss increase under the KV
   budget (exact dynamic programme over layers).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from zeroc.compression.fold import LayerFactors, build_compressed, pair_scores, value_factors
from zeroc.config import AttentionCompression, LayerCompression
from zeroc.errors import ZeroCError
from zeroc.evaluate import read_eval_tokens
from zeroc.loader import LoadedModel
from zeroc.model import Transformer


@dataclass(frozen=True)
class ZeroCFold:
    """Hyperparameters of ZeroC fold-mode compression."""

    budget: float = 0.5  # KV cache bytes as a fraction of the uncompressed cache
    rank_multiple: int = 16  # ranks are multiples of this (kernel tiles)
    calib_tokens: int = 16384  # tokens for the statistics
    sensitivity_tokens: int = 2048  # tokens for the per-layer sensitivity measurements
    window: int = 512  # calibration window length

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.rank_multiple <= 0 or self.rank_multiple % 2:
            raise ValueError(f"rank_multiple must be a positive even number, got {self.rank_multiple}")
        if min(self.calib_tokens, self.sensitivity_tokens, self.window) < 2:
            raise ValueError("calib_tokens, sensitivity_tokens and window must be >= 2")

    def candidate_ranks(self, head_dim: int) -> list[int]:
        if head_dim % self.rank_multiple:
            raise ValueError(f"rank_multiple {self.rank_multiple} does not divide head_dim {head_dim}")
        return list(range(self.rank_multiple, head_dim + 1, self.rank_multiple))


@dataclass(frozen=True)
class CalibrationReport:
    ranks: list[tuple[int, int]]  # (qk_rank, v_rank) per layer
    kv_fraction: float  # achieved KV bytes / uncompressed
    base_loss: float  # calibration loss of the source model (sensitivity tokens)
    predicted_loss: float  # base + the summed measured increases of the chosen ranks
    compressed_loss: float  # measured loss of the compressed model on the same tokens
    fingerprint: str


def _windows(tokens: Tensor, window: int, limit: int) -> Tensor:
    n = min(limit, tokens.numel()) // window
    if n == 0:
        raise ZeroCError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {window}")
    return tokens[: n * window].view(n, window)  # [n, window]


@torch.inference_mode()
def collect_statistics(model: Transformer, windows: Tensor, batch: int = 4, progress: bool = True):
    """Per layer: (q_sq [heads, d], k_sq [kv_heads, d], v_cov [kv_heads, d, d]) means over tokens."""
    cfg = model.config
    d, n_kv = cfg.head_dim, cfg.num_key_value_heads
    sums = [[torch.zeros(cfg.num_attention_heads, d, dtype=torch.float64), torch.zeros(n_kv, d, dtype=torch.float64),
             torch.zeros(n_kv, d, d, dtype=torch.float64)] for _ in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def q_hook(_m, _x, out, i=i):
            sums[i][0] += out.double().reshape(-1, cfg.num_attention_heads, d).pow(2).sum(0)

        def k_hook(_m, _x, out, i=i):
            sums[i][1] += out.double().reshape(-1, n_kv, d).pow(2).sum(0)

        def v_hook(_m, _x, out, i=i):
            v = out.double().reshape(-1, n_kv, d)
            sums[i][2] += torch.einsum("tgd,tge->gde", v, v)

        hooks += [attn.q_proj.register_forward_hook(q_hook), attn.k_proj.register_forward_hook(k_hook),
                  attn.v_proj.register_forward_hook(v_hook)]
    try:
        for start in tqdm(range(0, windows.shape[0], batch), desc="calibrate: statistics", disable=not progress):
            model(windows[start: start + batch])
    finally:
        for h in hooks:
            h.remove()
    count = windows.numel()
    return [tuple(t / count for t in s) for s in sums]


def compute_factors(model: Transformer, stats) -> list[LayerFactors]:
    cfg = model.config
    d, n_kv, group = cfg.head_dim, cfg.num_key_value_heads, cfg.group_size
    out = []
    for layer, (q_sq, k_sq, v_cov) in zip(model.model.layers, stats):
        order = torch.argsort(pair_scores(q_sq, k_sq, group), dim=-1, descending=True)
        wo = layer.self_attn.o_proj.weight.detach().view(-1, n_kv, group, d).permute(1, 2, 0, 3)  # [kv, grp, hid, d]
        pairs = [value_factors(v_cov[g], wo[g]) for g in range(n_kv)]
        out.append(LayerFactors(order, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    return out


@torch.inference_mode()
def mean_loss(model: Transformer, windows: Tensor, batch: int = 4) -> float:
    total = 0.0
    for start in range(0, windows.shape[0], batch):
        w = windows[start: start + batch]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def _layout(factors: list[LayerFactors], ranks: list[tuple[int, int]], budget: float, fp: str):
    return AttentionCompression(tuple(f.layer_compression(rq, rv) for f, (rq, rv) in zip(factors, ranks)), fp, budget)


def measure_sensitivity(model: Transformer, factors: list[LayerFactors], windows: Tensor, method: ZeroCFold,
                        progress: bool = True) -> tuple[float, dict[tuple[int, str, int], float]]:
    """Loss increase with one layer's Q/K or V cut to each candidate rank -> (base loss, increases)."""
    d = model.config.head_dim
    full = [(d, d)] * len(factors)
    base = mean_loss(model, windows)
    cands = [r for r in method.candidate_ranks(d) if r < d]
    jobs = [(i, kind, r) for i in range(len(factors)) for kind in ("qk", "v") for r in cands]
    deltas = {}
    for i, kind, r in tqdm(jobs, desc="calibrate: sensitivity", disable=not progress):
        ranks = list(full)
        ranks[i] = (r, d) if kind == "qk" else (d, r)
        deltas[(i, kind, r)] = mean_loss(build_compressed(model, factors, _layout(factors, ranks, 1.0, "")),
                                         windows) - base
    return base, deltas


def allocate_ranks(deltas: dict[tuple[int, str, int], float], num_layers: int, head_dim: int,
                   method: ZeroCFold) -> list[tuple[int, int]]:
    """Per-layer (qk_rank, v_rank) with the least summed loss increase within the budget."""
    m = method.rank_multiple
    cands = method.candidate_ranks(head_dim)
    capacity = math.floor(method.budget * num_layers * 2 * head_dim / m + 1e-9)  # in units of m dims
    if capacity < 2 * num_layers:
        raise ValueError(f"budget {method.budget} is below the smallest layout (rank {m} for Q/K and V in "
                         f"every layer = {m / head_dim:.3f})")
    cost = lambda i, kind, r: 0.0 if r == head_dim else deltas[(i, kind, r)]  # noqa: E731
    best: dict[int, tuple[float, list[tuple[int, int]]]] = {0: (0.0, [])}
    for i in range(num_layers):
        nxt: dict[int, tuple[float, list[tuple[int, int]]]] = {}
        for used, (loss, ranks) in best.items():
            for rq in cands:
                for rv in cands:
                    u = used + (rq + rv) // m
                    if u > capacity:
                        continue
                    cand = (loss + cost(i, "qk", rq) + cost(i, "v", rv), ranks + [(rq, rv)])
                    if u not in nxt or cand[0] < nxt[u][0]:
                        nxt[u] = cand
        best = nxt
    return min(best.values(), key=lambda c: c[0])[1]


def fingerprint(model_dir: Path, method: ZeroCFold, calib_tokens: Tensor) -> str:
    """Hash of the source model's files, the method's hyperparameters and the calibration tokens."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json", model_dir / "tokenizer.json"]:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    h.update(json.dumps(asdict(method), sort_keys=True).encode())
    h.update(calib_tokens.numpy().tobytes())
    return h.hexdigest()[:16]


def calibrate(loaded: LoadedModel, calib_file: str | Path, method: ZeroCFold,
              progress: bool = True) -> tuple[Transformer, CalibrationReport]:
    """Compress `loaded` with `method` on the text in `calib_file`."""
    cfg = loaded.config
    if cfg.compression is not None:
        raise ZeroCError(f"{loaded.path}: model is already compressed (fingerprint {cfg.compression.fingerprint})")
    method.candidate_ranks(cfg.head_dim)  # validates rank_multiple against this model
    tokens = read_eval_tokens(loaded.tokenizer, calib_file)
    windows = _windows(tokens, method.window, method.calib_tokens)
    sens_windows = _windows(tokens, method.window, method.sensitivity_tokens)
    fp = fingerprint(loaded.path, method, tokens)
    factors = compute_factors(loaded.model, collect_statistics(loaded.model, windows, progress=progress))
    base, deltas = measure_sensitivity(loaded.model, factors, sens_windows, method, progress)
    ranks = allocate_ranks(deltas, cfg.num_hidden_layers, cfg.head_dim, method)
    compressed = build_compressed(loaded.model, factors, _layout(factors, ranks, method.budget, fp))
    d = cfg.head_dim
    predicted = base + sum(deltas.get((i, "qk", rq), 0.0) + deltas.get((i, "v", rv), 0.0)
                           for i, (rq, rv) in enumerate(ranks))
    report = CalibrationReport(
        ranks=ranks, kv_fraction=sum(rq + rv for rq, rv in ranks) / (2 * d * len(ranks)), base_loss=base,
        predicted_loss=predicted, compressed_loss=mean_loss(compressed, sens_windows), fingerprint=fp,
    )
    return compressed, report
