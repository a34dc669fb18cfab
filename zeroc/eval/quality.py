"""`zeroc eval quality`: perplexity of every KV-compression method at equal KV budgets.

Methods (data, not code paths): the uncompressed model; per Q/K mode of `QualityConfig.zeroc_modes`
(default "auto", the default pipeline, row "zeroc") ZeroC on the fp16 cache, calibrated at each
budget (budget 1.0 is the uncompressed model), and ZeroC with int8 stacked on its compressed
cache ("zeroc-int8", `ZeroCVariant`); every baseline of `zeroc.policies.registry` on the
uncompressed model, through the paged cache and store `zeroc serve` runs (`perplexity_streaming`
with a `CacheConfig` naming it), each at the hyperparameters that hold the row's budget
(`KVMethod.at_budget`; KIVI: the widest full-precision residual whose average held fraction over a
window of `ctx` tokens fits). Two perplexity protocols are measured for all: streaming (every token of
windows of `ctx`, token by token through the cache) and prefill-then-score (`QualityConfig.prefill_tokens`
prefilled and compressed by the method, the next `score_tokens` scored teacher-forced: kvpress's
protocol); full-pass only where a method has a full-pass form (uncompressed and fp16 ZeroC: the
compression lives in the weights). Rows keep their per-window NLLs, so the report states every
comparison as a paired difference with its standard error (`zeroc.eval.paired`). Writes a markdown
report and a plot (streaming perplexity vs budget, one line per method).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from zeroc.compression.calibrate import MODES, Measurements, ZeroCMethod, compress
from zeroc.compression.layerwise import measure_any
from zeroc.config import CacheConfig, ZeroCError
from zeroc.eval.perplexity import PerplexityResult, perplexity_full, perplexity_prefill, perplexity_streaming
from zeroc.data import read_eval_tokens
from zeroc.loader import LoadedModel
from zeroc.model import Transformer
from zeroc.policies import BASELINES, REGISTRY, STACKABLE, cache_config, method_at_budget


BUDGETS = (1.0, 0.75, 0.5, 0.375, 0.25)
UNCOMPRESSED, ZEROC = "uncompressed", "zeroc"  # ZeroC rows: `zeroc_variants`


@dataclass(frozen=True)
class ZeroCVariant:
    """One ZeroC row: calibrated in Q/K `mode`, its compressed cache held as `stack` says.

    stack None: the fp16 cache, ZeroC calibrated at the row's budget. stack a name of
    `zeroc.policies.STACKABLE` (e.g. "int8"): that policy on ZeroC's compressed K/V, ZeroC
    calibrated at the largest rank budget whose stacked bytes fit the row's budget (the policy's
    `max_width_fraction`; the uncompressed model itself when the full widths fit)."""

    name: str
    mode: str = "auto"
    stack: str | None = None


def zeroc_variants(modes: tuple[str, ...]) -> tuple[ZeroCVariant, ...]:
    """Per mode the fp16 and the int8 row; "auto" (the default pipeline) is plain "zeroc"."""
    out = []
    for m in modes:
        name = ZEROC if m == "auto" else f"{ZEROC}-{m}"
        out += [ZeroCVariant(name, m), *(ZeroCVariant(f"{name}-{s}", m, s) for s in STACKABLE)]
    return tuple(out)


@dataclass(frozen=True)
class QualityConfig:
    ctx: int = 1024
    max_tokens: int | None = None
    budgets: tuple[float, ...] = BUDGETS
    batch_size: int = 16  # windows streamed together
    calibration: ZeroCMethod = field(default_factory=ZeroCMethod)  # its budget and mode are replaced per row
    zeroc_modes: tuple[str, ...] = ("auto",)
    prefill_tokens: int = 768  # prefill-then-score protocol: tokens prefilled (and compressed) per window
    score_tokens: int = 256  # ... and tokens scored after them

    def __post_init__(self) -> None:
        if self.prefill_tokens < 1 or self.score_tokens < 1:
            raise ValueError(f"prefill_tokens and score_tokens must be >= 1, got {self.prefill_tokens} and "
                             f"{self.score_tokens}")
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be in (0, 1], got {list(self.budgets)}")
        if self.ctx < 2:
            raise ValueError(f"ctx must be >= 2, got {self.ctx}")
        if not self.zeroc_modes or any(m not in MODES for m in self.zeroc_modes):
            raise ValueError(f"zeroc_modes must be among {', '.join(MODES)}, got {list(self.zeroc_modes)}")

    @property
    def variants(self) -> tuple[ZeroCVariant, ...]:
        return zeroc_variants(self.zeroc_modes)


@dataclass(frozen=True)
class QualityRow:
    method: str
    budget: float
    streaming_ppl: float | None  # None: the method cannot reach this budget
    full_ppl: float | None = None  # None: no full-pass form (token policies) or not reachable
    kv_fraction: float | None = None  # KV bits held / uncompressed fp16 bits (mean over steps for policies)
    kv_fraction_max: float | None = None  # largest fraction at positions >= 128 (policies)
    note: str = ""
    prefill_ppl: float | None = None  # prefill-then-score perplexity (None: not reachable, or no full window)
    stream_nll: tuple[float, ...] = ()  # mean NLL per streaming window (paired comparisons)
    stream_tokens: tuple[int, ...] = ()
    prefill_nll: tuple[float, ...] = ()  # mean NLL per prefill-then-score window
    prefill_tokens: tuple[int, ...] = ()


def _protocols(model: Transformer, tokens: torch.Tensor, cfg: QualityConfig, cache: CacheConfig | None = None
               ) -> tuple[PerplexityResult, PerplexityResult | None]:
    """Streaming and prefill-then-score results of `model` through the cache `cache` names (None: the
    plain one); the second is None when the text holds no full prefill + score window."""
    stream = perplexity_streaming(model, tokens, cfg.ctx, cfg.batch_size, progress=False, cache=cache)
    try:
        pre = perplexity_prefill(model, tokens, cfg.prefill_tokens, cfg.score_tokens, cfg.batch_size, cache,
                                 progress=False)
    except ValueError:
        pre = None
    return stream, pre


def _row(method: str, budget: float, stream: PerplexityResult, pre: PerplexityResult | None,
         **fields) -> QualityRow:
    return QualityRow(method, budget, stream.perplexity, prefill_ppl=None if pre is None else pre.perplexity,
                      stream_nll=stream.window_nll, stream_tokens=stream.window_tokens,
                      prefill_nll=() if pre is None else pre.window_nll,
                      prefill_tokens=() if pre is None else pre.window_tokens, **fields)


def _measure(loaded: LoadedModel, calib_file: str | Path, method: ZeroCMethod, modes: tuple[str, ...],
             progress: bool = False) -> Measurements:
    """One measurement that serves every mode of `modes` (both Q/K modes unless only one is asked)."""
    both = "auto" in modes or len(set(modes)) > 1
    return measure_any(loaded, calib_file, replace(method, mode="auto" if both else modes[0]), progress)


def zeroc_models(loaded: LoadedModel, calib_file: str | Path, budgets: list[float], method: ZeroCMethod,
                 modes: tuple[str, ...] = ("fold",), progress: bool = False
                 ) -> dict[tuple[str, float], tuple[Transformer, float]]:
    """ZeroC-compressed models per mode and budget -> {(mode, budget): (model, achieved KV fraction)}.

    The same as `calibrate(loaded, calib_file, replace(method, mode=m, budget=b))` for each pair, but
    the statistics, factors and sensitivities (which do not depend on the budget) are measured once.
    """
    meas = _measure(loaded, calib_file, method, modes, progress)
    out = {}
    for m in modes:
        for b in budgets:
            model, report = compress(loaded, meas, replace(method, mode=m, budget=b))
            out[(m, b)] = (model, report.kv_fraction)
    return out


def rank_budget(loaded: LoadedModel, variant: ZeroCVariant, budget: float) -> float:
    """The budget ZeroC is calibrated at for `variant`'s row at KV budget `budget` (1.0: uncompressed)."""
    if variant.stack is None:
        return budget
    entry = REGISTRY[variant.stack]
    return min(1.0, entry.method_class()(budget=budget, **entry.fixed).max_width_fraction(loaded.config))


def _method_row(model: Transformer, tokens: torch.Tensor, name: str, budget: float, cfg: QualityConfig,
                method: str | None = None) -> QualityRow:
    """Method `name` at `budget` on `model` through the paged cache, reported as row `method` (default: name)."""
    try:
        policy = method_at_budget(name, budget, model.config, cfg.ctx)
    except ValueError as exc:  # e.g. KIVI 4-bit cannot go below 0.3125
        return QualityRow(method or name, budget, None, note=str(exc))
    stream, pre = _protocols(model, tokens, cfg, cache_config(policy))
    return _row(method or name, budget, stream, pre, kv_fraction=stream.kv_fraction_mean,
                kv_fraction_max=stream.kv_fraction_max)


class _ZeroCRuns:
    """ZeroC models and their measured rows, each (mode, rank budget, stack) compressed and scored once
    (e.g. int8 on the full widths serves b=1 and b=0.75)."""

    def __init__(self, loaded: LoadedModel, calib_file: str | Path, tokens: torch.Tensor, cfg: QualityConfig):
        self.loaded, self.tokens, self.cfg = loaded, tokens, cfg
        self.calib_file, self.meas = calib_file, None
        self.done: dict[tuple[str, float, str | None], QualityRow] = {}

    def _model(self, mode: str, r: float) -> tuple[Transformer, float]:
        if r >= 1.0:
            return self.loaded.model, 1.0
        if self.meas is None:
            self.meas = _measure(self.loaded, self.calib_file, self.cfg.calibration, self.cfg.zeroc_modes)
        model, report = compress(self.loaded, self.meas, replace(self.cfg.calibration, mode=mode, budget=r))
        return model, report.kv_fraction

    def row(self, v: ZeroCVariant, budget: float) -> QualityRow:
        r = rank_budget(self.loaded, v, budget)
        key = (v.mode, r, v.stack)
        if key not in self.done:
            self.done[key] = self._score(v, r, budget)
        return replace(self.done[key], method=v.name, budget=budget)

    def _score(self, v: ZeroCVariant, r: float, budget: float) -> QualityRow:
        cfg = self.cfg
        try:
            model, fraction = self._model(v.mode, r)
        except ValueError as exc:  # rank budget below the smallest layout
            return QualityRow(v.name, budget, None, note=f"{v.name} at {budget:g}: {exc}")
        if v.stack is not None:
            return _method_row(model, self.tokens, v.stack, budget, cfg, v.name)
        stream, pre = _protocols(model, self.tokens, cfg)
        full = perplexity_full(model, self.tokens, cfg.ctx, progress=False).perplexity
        return _row(v.name, budget, stream, pre, full_ppl=full, kv_fraction=fraction, kv_fraction_max=fraction)


def run_quality(loaded: LoadedModel, calib_file: str | Path, data_file: str | Path, cfg: QualityConfig,
                progress: bool = True) -> list[QualityRow]:
    """Every method at every budget of `cfg` -> rows (method, budget)."""
    if loaded.config.compression is not None:
        raise ZeroCError(f"{loaded.path}: eval quality needs the uncompressed model (this one is compressed)")
    tokens = read_eval_tokens(loaded.tokenizer, data_file, cfg.max_tokens)
    variants = cfg.variants
    bar = tqdm(total=2 + len(cfg.budgets) * (len(variants) + len(BASELINES)), desc="eval quality", unit="run",
               disable=not progress)
    base_stream, base_pre = _protocols(loaded.model, tokens, cfg)
    bar.update()
    base_full = perplexity_full(loaded.model, tokens, cfg.ctx, progress=False).perplexity
    bar.update()
    identity = _row(UNCOMPRESSED, 1.0, base_stream, base_pre, full_ppl=base_full, kv_fraction=1.0,
                    kv_fraction_max=1.0, note="identity at 1.0")
    zeroc = _ZeroCRuns(loaded, calib_file, tokens, cfg)
    rows = []
    for b in cfg.budgets:
        rows.append(replace(identity, budget=b, note=""))
        for v in variants:
            bar.set_postfix_str(f"{v.name} @ {b}")
            if v.stack is None and b >= 1.0:  # ZeroC at full rank is the uncompressed model
                rows.append(replace(identity, method=v.name))
            else:
                rows.append(zeroc.row(v, b))
            bar.update()
        for name in BASELINES:
            bar.set_postfix_str(f"{name} @ {b}")
            # every baseline is the identity at 1.0 (tests check each policy against this)
            rows.append(replace(identity, method=name, full_ppl=None) if b >= 1.0
                        else _method_row(loaded.model, tokens, name, b, cfg))
            bar.update()
    bar.close()
    return rows


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")
