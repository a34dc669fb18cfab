"""`zeroc calibrate`: fit the ZeroC bases on calibration text, choose ranks and modes, fold, save.

1. Statistics: one pass over the calibration windows records, per layer, post-RoPE second moments
   of q (summed over each KV head's query group) and k, E[v v^T] per KV head, and the q, k, v
   activations of the first `ablation_tokens` tokens.
2. Factors: RoPE pairs ranked by greedy ablation on those activations (fold), post-RoPE Q/K bases
   (rotate) and V/O bases per KV head (`fold.py`); any rank is a prefix.
3. Sensitivity: KL(source || compressed) of the next-token distributions on calibration text,
   measured with one KV head's Q/K (per mode) or V cut to each candidate rank, everything else whole
   (`granularity` "layer": all of one layer's heads cut together).
   (The KL, not the loss increase: the loss of a few thousand tokens moves by +-0.001 nats either
   way from noise alone, which swamped the small cuts' real cost and misallocated ranks.)
   That is one forward per cut, from the cut layer on (divergence.py); for models where that is too
   many (`sensitivity` "local", or "auto" past `max_passes`), layerwise.py runs steps 1-3 layer by
   layer with a layer-local cost.
4. Allocation: Q/K and V ranks per KV head and the Q/K mode per layer (`auto`; `fold` and `rotate`
   force one) minimising the summed KL under the KV budget: an exact knapsack over each layer's
   heads per mode, then over layers (`allocate_head_ranks`; "layer": one (qk, v) per layer,
   `allocate_ranks`).
Steps 1-3 do not depend on the budget (`measure`); step 4 and the fold do (`compress`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from zeroc.attend import causal_attend
from zeroc.compression.divergence import Reference, cut_kl, divergence, layer_inputs, offset_positions, reference
from zeroc.compression.fold import (LayerFactors, ablation_pair_order, build_compressed, cut_attention, qk_factors,
                                    value_factors)
from zeroc.config import AttentionCompression, LayerCompression, ModelConfig, ZeroCError, check_tier
from zeroc.data import read_eval_tokens
from zeroc.loader import LoadedModel
from zeroc.model import Transformer

MODES = ("fold", "rotate", "auto")
GRANULARITIES = ("head", "layer")
# How sensitivity is measured: "kl", a full-model KL pass per cut; "local", layer by layer (layerwise.py): each
# cut's attention-output error, scaled to KL by a few full passes; "auto": "kl" while it needs at most
# `max_passes` (default 512) passes, else "local".
SENSITIVITIES = ("kl", "local", "auto")


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
    granularity: str = "head"  # ranks per KV head ("head") or one per layer for all its heads ("layer")
    sensitivity: str = "auto"  # one of SENSITIVITIES
    max_passes: int | None = None  # full-model KL passes the sensitivity may run (None: kl all, local 2 per layer)
    time_budget: float | None = None  # local: seconds after which no further KL passes start (None: no limit)

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
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}")
        if self.max_passes is not None and self.max_passes < 0:
            raise ValueError(f"max_passes must be >= 0, got {self.max_passes}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {self.time_budget}")

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
    # (layer, "fold" | "rotate" | "v", rank) -> KL; per KV head: (layer, kind, rank, head) -> KL
    deltas: dict[tuple, float]
    qk_modes: tuple[str, ...]  # the Q/K modes measured
    granularity: str = "layer"  # "head": one KV head cut at a time
    sensitivity: str = "kl"  # how the deltas were measured: "kl" or "local" (layerwise.py)


@dataclass(frozen=True)
class CalibrationReport:
    ranks: list[tuple]  # (qk_rank, v_rank) per layer; each a list of one per KV head where the heads differ
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


class Moments:
    """Running sums of one layer's post-RoPE q, k and v second moments (float64 whatever the model's dtype, on
    its device) and the activations of its first `sample_windows` windows."""

    def __init__(self, n_kv: int, group: int, d: int, sample_windows: int):
        self.n_kv, self.group, self.d, self.sample_windows = n_kv, group, d, sample_windows
        self.sums: list[Tensor] | None = None
        self.samples: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        # q: [b, T, heads, d]; k, v: [b, T, kv_heads, d]
        n_kv, d = self.n_kv, self.d
        if self.sums is None:
            self.sums = [torch.zeros(n_kv, d, d, dtype=torch.float64, device=q.device) for _ in range(3)]
        qd = q.double().reshape(-1, n_kv, self.group, d)
        self.sums[0] += torch.einsum("tgjd,tgje->gde", qd, qd)
        for slot, x in ((1, k), (2, v)):
            xd = x.double().reshape(-1, n_kv, d)
            self.sums[slot] += torch.einsum("tgd,tge->gde", xd, xd)
        if sum(x[0].shape[0] for x in self.samples) < self.sample_windows:
            self.samples.append((q.clone(), k.clone(), v.clone()))

    def stats(self, count: int) -> LayerStats:
        """The means over `count` tokens."""
        sample = tuple(torch.cat(x)[: self.sample_windows] for x in zip(*self.samples)) or None
        return LayerStats(*(t / count for t in self.sums), sample)


@torch.inference_mode()
def collect_statistics(model: Transformer, windows: Tensor, batch: int = 4, progress: bool = True,
                       sample_tokens: int = 1024, seed: int = 0) -> list[LayerStats]:
    """Per-layer moments of q, k (after RoPE) and v over `windows` [n, T], each at a random position
    offset (`offset_positions`), and the activations of the first windows (at least `sample_tokens`
    tokens, at most all)."""
    cfg = model.config
    sample_windows = -(-sample_tokens // windows.shape[1])
    moments = [Moments(cfg.num_key_value_heads, cfg.group_size, cfg.head_dim, sample_windows)
               for _ in model.model.layers]

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        moments[layer].add(q, k, v)
        return causal_attend(layer, q, k, v, scale)

    positions = offset_positions(windows, cfg.max_position_embeddings, seed).to(windows.device)  # [n, T]
    for start in tqdm(range(0, windows.shape[0], batch), desc="calibrate: statistics", disable=not progress):
        model.forward_attend(windows[start: start + batch], positions[start: start + batch], attend)
    return [m.stats(windows.numel()) for m in moments]


def layer_factors(attn, cfg, st: LayerStats) -> LayerFactors:
    """One layer's rank-ordered factors from its statistics (`fold.py`)."""
    d, n_kv, group = cfg.head_dim, cfg.num_key_value_heads, cfg.group_size
    wo = attn.o_proj.weight.detach().double().view(-1, n_kv, group, d).permute(1, 2, 0, 3)  # [kv, grp, hid, d]
    metric = torch.einsum("gjhd,gjhe->gjde", wo, wo).float()  # [kv, grp, d, d]: W_o,h^T W_o,h
    if st.sample is None:  # no activations: pairs stay in index order (only whole Q/K may be folded)
        order = torch.arange(d // 2, device=wo.device).expand(n_kv, -1)
    else:
        q, k, v = (x.transpose(1, 2).float() for x in st.sample)  # [n, heads | kv, T, d]
        order = torch.stack([ablation_pair_order(q[:, g * group:(g + 1) * group], k[:, g:g + 1],
                                                 v[:, g:g + 1], metric[g], attn.scale) for g in range(n_kv)])
    vf = [value_factors(st.v_cov[g], wo[g]) for g in range(n_kv)]
    qk = [qk_factors(st.q_cov[g], st.k_cov[g]) for g in range(n_kv)]
    stack = lambda pairs, i: torch.stack([p[i] for p in pairs])  # noqa: E731
    return LayerFactors(order, stack(vf, 0), stack(vf, 1), stack(qk, 0), stack(qk, 1))


def compute_factors(model: Transformer, stats: list[LayerStats], progress: bool = False) -> list[LayerFactors]:
    layers = list(zip(model.model.layers, stats))
    return [layer_factors(layer.self_attn, model.config, st)
            for layer, st in tqdm(layers, desc="calibrate: factors", disable=not progress)]


def _layout(factors: list[LayerFactors], ranks: list[tuple], modes: list[str], method: ZeroCMethod,
            fp: str) -> AttentionCompression:
    layers = tuple(f.layer_compression(rq, rv, m) for f, (rq, rv), m in zip(factors, ranks, modes))
    return AttentionCompression(layers, fp, method.budget, f"zeroc-{method.mode}", method.sinks, method.recent)


def layer_cuts(cfg: ModelConfig, method: ZeroCMethod) -> list[tuple]:
    """(kind, rank, *head) of every cut one layer's sensitivity measures: Q/K in each of `method.qk_modes`, or V,
    at each candidate rank below the head dim, one KV head at a time (granularity "layer": all, no head)."""
    d, kv = cfg.head_dim, cfg.num_key_value_heads
    cands = [r for r in method.candidate_ranks(d) if r < d]
    heads = [(g,) for g in range(kv)] if method.granularity == "head" else [()]
    return [(kind, r, *h) for h in heads for kind in (*method.qk_modes, "v") for r in cands]


def cut_compression(cfg: ModelConfig, factors: LayerFactors, kind: str, rank: int,
                    head: int | None = None) -> LayerCompression:
    """One layer with Q/K (kind "fold" | "rotate") or V cut to `rank` on KV head `head` (None: on every head)."""
    d, kv = cfg.head_dim, cfg.num_key_value_heads
    cut = rank if head is None else tuple(rank if g == head else d for g in range(kv))
    return factors.layer_compression(d, cut) if kind == "v" else factors.layer_compression(cut, d, kind)


def measure_sensitivity(model: Transformer, factors: list[LayerFactors], ref: Reference, method: ZeroCMethod,
                        progress: bool = True) -> dict[tuple, float]:
    """KL(source || the model with one cut of `layer_cuts`) for every layer's cuts.

    -> {(layer, "fold" | "rotate" | "v", rank, head): KL(source || cut model)}; "layer": keys without the head
    """
    cfg = model.config
    jobs = [(i, *cut) for i in range(len(factors)) for cut in layer_cuts(cfg, method)]
    deltas, inputs = {}, {}
    for job in tqdm(jobs, desc="calibrate: sensitivity", disable=not progress):  # layer by layer
        i = job[0]
        if i not in inputs:  # the layers before i run once for all of layer i's cuts
            inputs = {i: layer_inputs(model, ref, i)}
        comp = cut_compression(cfg, factors[i], *job[1:])
        deltas[job] = cut_kl(model, ref, i, cut_attention(model.model.layers[i].self_attn, cfg, i, factors[i], comp),
                             inputs[i])
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


Options = dict[int, tuple[float, object]]  # units used -> (least cost, the choice that costs it)


def _knapsack(items: list[Options], capacity: int) -> dict[int, tuple[float, list]]:
    """Exact min-cost choice of one option per item within `capacity` units -> {units used: (cost, choices)}."""
    costs: dict[int, float] = {0: 0.0}
    back: list[dict[int, tuple[int, object]]] = []  # per item: units used after it -> (units before, pick)
    for options in items:
        nxt: dict[int, float] = {}
        step: dict[int, tuple[int, object]] = {}
        for used, cost in costs.items():
            for units, (c, pick) in options.items():
                u = used + units
                if u <= capacity and (u not in nxt or cost + c < nxt[u]):
                    nxt[u], step[u] = cost + c, (used, pick)
        costs = nxt
        back.append(step)
    out = {}
    for u, cost in costs.items():
        picks, at = [], u
        for step in reversed(back):
            at, pick = step[at]
            picks.append(pick)
        out[u] = (cost, picks[::-1])
    return out


def _check_capacity(method: ZeroCMethod, capacity: int, minimum: int, head_dim: int) -> None:
    if capacity < minimum:
        m = method.multiple(head_dim)
        raise ValueError(f"budget {method.budget} is below the smallest layout (rank {m} for Q/K and V in "
                         f"every layer = {m / head_dim:.3f})")


def allocate_ranks(deltas: dict[tuple, float], num_layers: int, head_dim: int,
                   method: ZeroCMethod) -> list[tuple[int, int]]:
    """Per-layer (qk_rank, v_rank), one for all the layer's heads, with the least summed KL within the budget.
    deltas: {(layer, "qk" | "v", rank): KL} (`choose_qk_modes`)."""
    m, cands = method.multiple(head_dim), method.candidate_ranks(head_dim)
    capacity = math.floor(method.budget * num_layers * 2 * head_dim / m + 1e-9)  # in units of m dims
    _check_capacity(method, capacity, 2 * num_layers, head_dim)
    cost = lambda i, kind, r: 0.0 if r == head_dim else deltas[(i, kind, r)]  # noqa: E731
    layers = []
    for i in range(num_layers):
        options: Options = {}
        for rq in cands:
            for rv in cands:
                c, u = cost(i, "qk", rq) + cost(i, "v", rv), (rq + rv) // m
                if u not in options or c < options[u][0]:
                    options[u] = (c, (rq, rv))
        layers.append(options)
    return min(_knapsack(layers, capacity).values(), key=lambda c: c[0])[1]


def _rank_options(cost, m: int, cands: list[int]) -> Options:
    # one KV head's Q/K or V: the cost of each candidate rank, in units of m dims
    return {r // m: (cost(r), r) for r in cands}


def allocate_head_ranks(deltas: dict[tuple, float], num_layers: int, kv_heads: int, head_dim: int,
                        method: ZeroCMethod) -> tuple[list[tuple[tuple[int, ...], tuple[int, ...]]], list[str]]:
    """Q/K and V ranks per KV head and the Q/K mode per layer (one of `method.qk_modes`, fold on ties and
    wherever Q/K stays whole) with the least summed KL within the budget: per layer and mode an exact knapsack
    over its heads' cuts, then one over layers. deltas: {(layer, kind, rank, head): KL} (`measure_sensitivity`).
    -> ([(qk ranks, v ranks) per KV head] per layer, [mode] per layer)"""
    m, cands, d = method.multiple(head_dim), method.candidate_ranks(head_dim), head_dim
    capacity = math.floor(method.budget * num_layers * kv_heads * 2 * d / m + 1e-9)  # in units of m dims
    _check_capacity(method, capacity, 2 * num_layers * kv_heads, d)
    cost = lambda i, kind, g: lambda r: 0.0 if r == d else deltas[(i, kind, r, g)]  # noqa: E731
    layers: list[Options] = []
    for i in range(num_layers):
        values = [_rank_options(cost(i, "v", g), m, cands) for g in range(kv_heads)]
        options: Options = {}
        for mode in method.qk_modes:  # "fold" first: a tie keeps it (no run-time work)
            keys = [_rank_options(cost(i, mode, g), m, cands) for g in range(kv_heads)]
            for u, (c, picks) in _knapsack(keys + values, 2 * kv_heads * d // m).items():
                qk, v = tuple(picks[:kv_heads]), tuple(picks[kv_heads:])
                # on a tie the layout with fewer runs of equal-rank heads: fewer attention calls per layer
                if u not in options or (c, _runs(qk, v)) < (options[u][0], _runs(*options[u][1][:2])):
                    options[u] = (c, (qk, v, mode if min(qk) < d else "fold"))  # whole Q/K: every pair kept
        layers.append(options)
    picks = min(_knapsack(layers, capacity).values(), key=lambda c: c[0])[1]
    return [(qk, v) for qk, v, _ in picks], [mode for _, _, mode in picks]


def _runs(qk: tuple[int, ...], v: tuple[int, ...]) -> int:
    # runs of consecutive KV heads with equal (qk, v) ranks (zeroc/head_ranks.py)
    return 1 + sum(a != b for a, b in zip(zip(qk, v), list(zip(qk, v))[1:]))


def _one_or_all(ranks: tuple[int, ...]) -> int | list[int]:
    """A layer's ranks as the report prints them: one if its KV heads agree, else one per head."""
    return ranks[0] if len(set(ranks)) == 1 else list(ranks)


def fingerprint(model_dir: Path, method: ZeroCMethod, calib_tokens: Tensor) -> str:
    """Hash of the source model's files, the method's hyperparameters and the calibration tokens."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json", model_dir / "tokenizer.json"]:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    params = asdict(method)
    if not method.sinks and not method.recent:  # no tier: the same fingerprint as before the tier existed
        del params["sinks"], params["recent"]
    if method.granularity == "layer":  # per-layer ranks, as before per-head ranks existed: the same fingerprint
        del params["granularity"]
    for name, default in (("sensitivity", "kl"), ("max_passes", None), ("time_budget", None)):
        if params[name] == default:  # full KL, unbounded: the same fingerprint as before these existed
            del params[name]
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
    device = next(loaded.model.parameters()).device
    windows = _windows(tokens, method.window, method.calib_tokens).to(device)
    ref = reference(loaded.model, _windows(tokens, method.window, method.sensitivity_tokens).to(device))
    stats = collect_statistics(loaded.model, windows, progress=progress,
                               sample_tokens=method.ablation_tokens if "fold" in method.qk_modes else 0)
    factors = compute_factors(loaded.model, stats, progress)
    deltas = measure_sensitivity(loaded.model, factors, ref, method, progress)
    return Measurements(tokens, factors, ref, deltas, method.qk_modes, method.granularity)


def compress(loaded: LoadedModel, meas: Measurements, method: ZeroCMethod) -> tuple[Transformer, CalibrationReport]:
    """Step 4 and the fold: ranks and modes for `method.budget` from `meas` (which must have measured
    every mode `method` allows) -> the compressed model and its report."""
    cfg = loaded.config
    d, layers = cfg.head_dim, cfg.num_hidden_layers
    if not set(method.qk_modes) <= set(meas.qk_modes):
        raise ValueError(f"mode {method.mode!r} needs measurements of {method.qk_modes}, have {meas.qk_modes}")
    if method.granularity != meas.granularity:
        raise ValueError(f"granularity {method.granularity!r} needs measurements at that granularity, have "
                         f"{meas.granularity!r}")
    if method.granularity == "head":
        ranks, modes = allocate_head_ranks(meas.deltas, layers, cfg.num_key_value_heads, d, method)
        predicted = sum(meas.deltas.get((i, kind, r, g), 0.0) for i, ((qk, v), mode) in enumerate(zip(ranks, modes))
                        for kind, heads in ((mode, qk), ("v", v)) for g, r in enumerate(heads))
    else:
        costs, mode_of = choose_qk_modes(meas.deltas, method)
        ranks = allocate_ranks(costs, layers, d, method)
        modes = [mode_of.get((i, rq), "fold") for i, (rq, _) in enumerate(ranks)]  # rank d: every pair, the identity
        predicted = sum(costs.get((i, "qk", rq), 0.0) + costs.get((i, "v", rv), 0.0)
                        for i, (rq, rv) in enumerate(ranks))
    fp = fingerprint(loaded.path, replace(method, sensitivity=meas.sensitivity), meas.tokens)
    layout = _layout(meas.factors, ranks, modes, method, fp)
    compressed = build_compressed(loaded.model, meas.factors, layout)
    kl, loss = divergence(compressed, meas.reference)
    geometry = [compressed.config.kv_geometry(i) for i in range(layers)]
    report = CalibrationReport(
        ranks=[tuple(_one_or_all(r) for r in compressed.config.head_ranks(i)) for i in range(layers)],
        modes=modes, kv_fraction=sum(h * (k + v) for h, k, v in geometry) / (2 * d * cfg.num_key_value_heads * layers),
        base_loss=meas.reference.loss, compressed_loss=loss, measured_kl=kl, fingerprint=fp, predicted_kl=predicted,
    )
    return compressed, report


def calibrate(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod,
              progress: bool = True) -> tuple[Transformer, CalibrationReport]:
    """Compress `loaded` with `method` on the text in `calib_file`."""
    return compress(loaded, measure(loaded, calib_file, method, progress), method)
