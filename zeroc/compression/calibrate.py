"""`zeroc calibrate`: fit the ZeroC bases on calibration text, choose ranks and modes, fold, save.

1. Statistics: one pass over the calibration windows records, per layer, post-RoPE second moments
   of q (summed over each KV head's query group) and k, E[v v^T] per KV head, and the q, k, v
   activations of the first `ablation_tokens` tokens.
2. Factors: RoPE pairs ranked by greedy ablation on those activations (fold), post-RoPE Q/K bases
   (rotate) and V/O bases per KV head (`fold.py`); any rank is a prefix.
3. Sensitivity: KL(source || compressed) of the next-token distributions on calibration text,
   measured with one layer's Q/K (per mode) or V cut to each candidate rank, everything else whole.
   (The KL, not the loss increase: the loss of a few thousand tokens moves by +-0.001 nats either
   way from noise alone, which swamped the small cuts' real cost and misallocated ranks.)
4. Allocation: per layer the Q/K mode with the lower measured KL at each rank (`auto`; `fold` and
   `rotate` force one), then (qk_rank, v_rank) per layer minimising the summed KL under the KV
   budget (exact dynamic programme over layers).
Steps 1-3 do not depend on the budget (`measure`); step 4 and the fold do (`compress`).
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

from zeroc.compression.fold import (LayerFactors, ablation_pair_order, build_compressed, qk_factors,
                                    value_factors)
from zeroc.config import AttentionCompression, check_tier
from zeroc.errors import ZeroCError
from zeroc.evaluate import read_eval_tokens
from zeroc.loader import LoadedModel
from zeroc.model import Transformer, causal_attend

MODES = ("fold", "rotate", "auto")


@dataclass(frozen=True)
class ZeroCMethod:
    """Hyperparameters of ZeroC compression."""

    budget: float = 0.5  # KV cache bytes as a fraction of the uncompressed cache
    mode: str = "auto"  # Q/K: "fold" (RoPE pairs), "rotate" (post-RoPE bases) or "auto" (per layer, measured)
    rank_multiple: int | None = None  # ranks are multiples of this (kernel tiles); None: 8 if head_dim <= 64, else 16
    calib_tokens: int = 16384  # tokens for the statistics
    sensitivity_tokens: int = 2048  # tokens for the per-layer sensitivity measurements
    window: int = 512  # calibration window length
    ablation_tokens: int = 1024  # tokens whose activations rank the RoPE pairs (fold)
    sinks: int = 0  # token tier (zeroc/tier.py): first tokens every query sees at full rank
    recent: int = 0  # token tier: each query's last tokens (itself included) seen at full rank

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rank_multiple is not None and (self.rank_multiple <= 0 or self.rank_multiple % 2):
            raise ValueError(f"rank_multiple must be a positive even number, got {self.rank_multiple}")
        if min(self.calib_tokens, self.sensitivity_tokens, self.window, self.ablation_tokens) < 2:
            raise ValueError("calib_tokens, sensitivity_tokens, window and ablation_tokens must be >= 2")
        check_tier(self.sinks, self.recent)

    @property
    def qk_modes(self) -> tuple[str, ...]:
        """The Q/K modes whose sensitivity is measured and allowed."""
        return ("fold", "rotate") if self.mode == "auto" else (self.mode,)

    def multiple(self, head_dim: int) -> int:
        """The rank multiple for `head_dim`. By default 16 (kernel tiles), but 8 up to head_dim 64: on the
        bundled model (head_dim 64) multiples of 8 measurably help (docs/compression.md)."""
        if self.rank_multiple is not None:
            return self.rank_multiple
        return 8 if head_dim <= 64 else 16

    def candidate_ranks(self, head_dim: int) -> list[int]:
        m = self.multiple(head_dim)
        if head_dim % m:
            raise ValueError(f"rank_multiple {m} does not divide head_dim {head_dim}")
        return list(range(m, head_dim + 1, m))


@dataclass(frozen=True)
class LayerStats:
    """Calibration moments of one layer, means over tokens (q and k after RoPE), and a sample."""

    q_cov: Tensor  # [kv_heads, d, d] sum over the KV head's query heads of E[q q^T]
    k_cov: Tensor  # [kv_heads, d, d] E[k k^T]
    v_cov: Tensor  # [kv_heads, d, d] E[v v^T]
    sample: tuple[Tensor, Tensor, Tensor] | None  # q [n, T, heads, d], k and v [n, T, kv_heads, d] of the first
    # windows; None if none were kept (sample_tokens=0: rotate-only calibrations never rank pairs)


@dataclass(frozen=True)
class Measurements:
    """What calibration measures once, whatever the budget."""

    tokens: Tensor  # [n] the calibration text
    factors: list[LayerFactors]
    reference: Reference  # the source model on the sensitivity windows
    deltas: dict[tuple[int, str, int], float]  # (layer, "fold" | "rotate" | "v", rank) -> KL
    qk_modes: tuple[str, ...]  # the Q/K modes measured


@dataclass(frozen=True)
class CalibrationReport:
    ranks: list[tuple[int, int]]  # (qk_rank, v_rank) per layer
    modes: list[str]  # Q/K mode per layer: "fold" | "rotate"
    kv_fraction: float  # achieved KV bytes / uncompressed
    base_loss: float  # calibration loss of the source model (sensitivity tokens, nats per token)
    compressed_loss: float  # calibration loss of the compressed model on the same tokens
    predicted_kl: float  # the summed KLs measured for each chosen cut alone (nats per token)
    measured_kl: float  # KL(source || compressed model) on the same tokens
    fingerprint: str


def _windows(tokens: Tensor, window: int, limit: int) -> Tensor:
    n = min(limit, tokens.numel()) // window
    if n == 0:
        raise ZeroCError(f"calibration text has {tokens.numel()} tokens, fewer than one window of {window}")
    return tokens[: n * window].view(n, window)  # [n, window]


@torch.inference_mode()
def collect_statistics(model: Transformer, windows: Tensor, batch: int = 4, progress: bool = True,
                       sample_tokens: int = 1024, seed: int = 0) -> list[LayerStats]:
    """Per-layer moments of q, k (after RoPE) and v over `windows` [n, T], each at a random position
    offset (`offset_positions`), and the activations of the first windows (at least `sample_tokens`
    tokens, at most all)."""
    cfg = model.config
    d, n_kv, group = cfg.head_dim, cfg.num_key_value_heads, cfg.group_size
    zeros = lambda: torch.zeros(n_kv, d, d, dtype=torch.float64)  # noqa: E731
    sums = [[zeros(), zeros(), zeros()] for _ in model.model.layers]
    samples: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in model.model.layers]
    sample_windows = -(-sample_tokens // windows.shape[1])

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        # q: [b, T, heads, d]; k, v: [b, T, kv_heads, d]
        acc, qd = sums[layer], q.double().reshape(-1, n_kv, group, d)
        acc[0] += torch.einsum("tgjd,tgje->gde", qd, qd)
        for slot, x in ((1, k), (2, v)):
            xd = x.double().reshape(-1, n_kv, d)
            acc[slot] += torch.einsum("tgd,tge->gde", xd, xd)
        if sum(x[0].shape[0] for x in samples[layer]) < sample_windows:
            samples[layer].append((q.clone(), k.clone(), v.clone()))
        return causal_attend(layer, q, k, v, scale)

    positions = offset_positions(windows, cfg.max_position_embeddings, seed)  # [n, T]
    for start in tqdm(range(0, windows.shape[0], batch), desc="calibrate: statistics", disable=not progress):
        model.forward_attend(windows[start: start + batch], positions[start: start + batch], attend)
    count = windows.numel()
    return [LayerStats(*(t / count for t in s), tuple(torch.cat(x)[:sample_windows] for x in zip(*smp)) or None)
            for s, smp in zip(sums, samples)]


def compute_factors(model: Transformer, stats: list[LayerStats], progress: bool = False) -> list[LayerFactors]:
    cfg = model.config
    d, n_kv, group = cfg.head_dim, cfg.num_key_value_heads, cfg.group_size
    out = []
    for layer, st in tqdm(list(zip(model.model.layers, stats)), desc="calibrate: factors", disable=not progress):
        attn = layer.self_attn
        wo = attn.o_proj.weight.detach().double().view(-1, n_kv, group, d).permute(1, 2, 0, 3)  # [kv, grp, hid, d]
        metric = torch.einsum("gjhd,gjhe->gjde", wo, wo).float()  # [kv, grp, d, d]: W_o,h^T W_o,h
        if st.sample is None:  # no activations: pairs stay in index order (only whole Q/K may be folded)
            order = torch.arange(d // 2).expand(n_kv, -1)
        else:
            q, k, v = (x.transpose(1, 2) for x in st.sample)  # [n, heads | kv, T, d]
            order = torch.stack([ablation_pair_order(q[:, g * group:(g + 1) * group], k[:, g:g + 1],
                                                     v[:, g:g + 1], metric[g], attn.scale) for g in range(n_kv)])
        vf = [value_factors(st.v_cov[g], wo[g]) for g in range(n_kv)]
        qk = [qk_factors(st.q_cov[g], st.k_cov[g]) for g in range(n_kv)]
        stack = lambda pairs, i: torch.stack([p[i] for p in pairs])  # noqa: E731
        out.append(LayerFactors(order, stack(vf, 0), stack(vf, 1), stack(qk, 0), stack(qk, 1)))
    return out


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
    logits = model.forward_attend(windows[:, :-1], positions[:, :-1], causal_attend)
    return F.log_softmax(logits.float(), dim=-1)


def _nll(log_probs: Tensor, windows: Tensor) -> float:
    return -log_probs.gather(-1, windows[:, 1:, None]).sum().item()


def reference(model: Transformer, windows: Tensor, batch: int = 4, seed: int = 1) -> Reference:
    positions = offset_positions(windows, model.config.max_position_embeddings, seed)
    lps = [_log_probs(model, windows[i: i + batch], positions[i: i + batch]) for i in range(0, windows.shape[0], batch)]
    nll = sum(_nll(lp, windows[i * batch: (i + 1) * batch]) for i, lp in enumerate(lps))
    return Reference(windows, positions, lps, nll / (windows.shape[0] * (windows.shape[1] - 1)), batch)


def divergence(model: Transformer, ref: Reference) -> tuple[float, float]:
    """-> (mean KL(source || model) per predicted token, mean NLL of `model`) on the reference windows."""
    kl = nll = 0.0
    for w, pos, src in ref.batches():
        lp = _log_probs(model, w, pos)
        kl += (src.exp() * (src - lp)).sum().item()
        nll += _nll(lp, w)
    count = ref.windows.shape[0] * (ref.windows.shape[1] - 1)
    return kl / count, nll / count


def _layout(factors: list[LayerFactors], ranks: list[tuple[int, int]], modes: list[str], method: ZeroCMethod,
            fp: str) -> AttentionCompression:
    layers = tuple(f.layer_compression(rq, rv, m) for f, (rq, rv), m in zip(factors, ranks, modes))
    return AttentionCompression(layers, fp, method.budget, f"zeroc-{method.mode}", method.sinks, method.recent)


def measure_sensitivity(model: Transformer, factors: list[LayerFactors], ref: Reference, method: ZeroCMethod,
                        progress: bool = True) -> dict[tuple[int, str, int], float]:
    """KL with one layer's Q/K (in each of `method.qk_modes`) or V cut to each candidate rank.

    -> {(layer, "fold" | "rotate" | "v", rank): KL(source || cut model)}
    """
    d = model.config.head_dim
    cands = [r for r in method.candidate_ranks(d) if r < d]
    jobs = [(i, kind, r) for i in range(len(factors)) for kind in (*method.qk_modes, "v") for r in cands]
    deltas = {}
    for i, kind, r in tqdm(jobs, desc="calibrate: sensitivity", disable=not progress):
        layers = [f.layer_compression(d, d) for f in factors]  # all pairs, V/O at rank d: the identity
        layers[i] = factors[i].layer_compression(d, r) if kind == "v" else factors[i].layer_compression(r, d, kind)
        layout = AttentionCompression(tuple(layers), "", 1.0)
        deltas[(i, kind, r)] = divergence(build_compressed(model, factors, layout), ref)[0]
    return deltas


def choose_qk_modes(deltas: dict[tuple[int, str, int], float], method: ZeroCMethod
                    ) -> tuple[dict[tuple[int, str, int], float], dict[tuple[int, int], str]]:
    """Per layer and Q/K rank, the allowed mode with the least measured KL (fold on ties: it costs
    nothing at run time) -> (KLs keyed (layer, "qk" | "v", rank), {(layer, rank): mode})."""
    costs = {key: delta for key, delta in deltas.items() if key[1] == "v"}
    modes: dict[tuple[int, int], str] = {}
    for (i, kind, r), delta in sorted(deltas.items()):
        if kind in method.qk_modes and ((i, "qk", r) not in costs or delta < costs[(i, "qk", r)]
                                        or (delta == costs[(i, "qk", r)] and kind == "fold")):
            costs[(i, "qk", r)], modes[(i, r)] = delta, kind
    return costs, modes


def allocate_ranks(deltas: dict[tuple[int, str, int], float], num_layers: int, head_dim: int,
                   method: ZeroCMethod) -> list[tuple[int, int]]:
    """Per-layer (qk_rank, v_rank) with the least summed KL (or loss increase) within the budget."""
    m = method.multiple(head_dim)
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


def fingerprint(model_dir: Path, method: ZeroCMethod, calib_tokens: Tensor) -> str:
    """Hash of the source model's files, the method's hyperparameters and the calibration tokens."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json", model_dir / "tokenizer.json"]:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    params = asdict(method)
    if not method.sinks and not method.recent:  # no tier: the same fingerprint as before the tier existed
        del params["sinks"], params["recent"]
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(calib_tokens.numpy().tobytes())
    return h.hexdigest()[:16]


def measure(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod, progress: bool = True) -> Measurements:
    """Steps 1-3 (statistics, factors, sensitivity of every mode in `method.qk_modes`) on `calib_file`."""
    cfg = loaded.config
    if cfg.compression is not None:
        raise ZeroCError(f"{loaded.path}: model is already compressed (fingerprint {cfg.compression.fingerprint})")
    method.candidate_ranks(cfg.head_dim)  # validates rank_multiple against this model
    tokens = read_eval_tokens(loaded.tokenizer, calib_file)
    windows = _windows(tokens, method.window, method.calib_tokens)
    ref = reference(loaded.model, _windows(tokens, method.window, method.sensitivity_tokens))
    stats = collect_statistics(loaded.model, windows, progress=progress,
                               sample_tokens=method.ablation_tokens if "fold" in method.qk_modes else 0)
    factors = compute_factors(loaded.model, stats, progress)
    deltas = measure_sensitivity(loaded.model, factors, ref, method, progress)
    return Measurements(tokens, factors, ref, deltas, method.qk_modes)


def compress(loaded: LoadedModel, meas: Measurements, method: ZeroCMethod) -> tuple[Transformer, CalibrationReport]:
    """Step 4 and the fold: ranks and modes for `method.budget` from `meas` (which must have measured
    every mode `method` allows) -> the compressed model and its report."""
    cfg = loaded.config
    d, layers = cfg.head_dim, cfg.num_hidden_layers
    if not set(method.qk_modes) <= set(meas.qk_modes):
        raise ValueError(f"mode {method.mode!r} needs measurements of {method.qk_modes}, have {meas.qk_modes}")
    costs, mode_of = choose_qk_modes(meas.deltas, method)
    ranks = allocate_ranks(costs, layers, d, method)
    modes = [mode_of.get((i, rq), "fold") for i, (rq, _) in enumerate(ranks)]  # rank d: every pair, the identity
    fp = fingerprint(loaded.path, method, meas.tokens)
    compressed = build_compressed(loaded.model, meas.factors, _layout(meas.factors, ranks, modes, method, fp))
    kl, loss = divergence(compressed, meas.reference)
    report = CalibrationReport(
        ranks=ranks, modes=modes, kv_fraction=sum(rq + rv for rq, rv in ranks) / (2 * d * len(ranks)),
        base_loss=meas.reference.loss, compressed_loss=loss, measured_kl=kl, fingerprint=fp,
        predicted_kl=sum(costs.get((i, "qk", rq), 0.0) + costs.get((i, "v", rv), 0.0)
                         for i, (rq, rv) in enumerate(ranks)),
    )
    return compressed, report


def calibrate(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod,
              progress: bool = True) -> tuple[Transformer, CalibrationReport]:
    """Compress `loaded` with `method` on the text in `calib_file`."""
    return compress(loaded, measure(loaded, calib_file, method, progress), method)
