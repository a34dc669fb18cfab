"""`zeroc eval quality`: perplexity of every KV-compression method at equal KV budgets.

Methods: the uncompressed model, ZeroC in each Q/K mode of `QualityConfig.zeroc_modes` (rows
"zeroc-fold", "zeroc-rotate", "zeroc-auto"; calibrated at each budget; budget 1.0 is the
uncompressed model) and every baseline policy of `zeroc.policies` on the uncompressed model.
Streaming perplexity is measured for all; full-pass only where a method has a full-pass form
(uncompressed and ZeroC: the compression lives in the weights). Writes a markdown report and a
plot (streaming perplexity vs budget, one line per method).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from zeroc.compression.calibrate import MODES, ZeroCMethod, compress, measure
from zeroc.errors import ZeroCError
from zeroc.evaluate import perplexity_full, perplexity_streaming, read_eval_tokens
from zeroc.loader import LoadedModel
from zeroc.model import Transformer
from zeroc.policies import POLICY_NAMES, make_policy
from zeroc.policies.streaming import perplexity_with_policy

BUDGETS = (1.0, 0.75, 0.5, 0.375, 0.25)
UNCOMPRESSED, ZEROC = "uncompressed", "zeroc"  # ZeroC rows are named f"{ZEROC}-{mode}"


@dataclass(frozen=True)
class QualityConfig:
    ctx: int = 1024
    max_tokens: int | None = None
    budgets: tuple[float, ...] = BUDGETS
    batch_size: int = 16  # windows streamed together
    calibration: ZeroCMethod = field(default_factory=ZeroCMethod)  # its budget and mode are replaced per row
    zeroc_modes: tuple[str, ...] = ("fold", "rotate", "auto")

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be in (0, 1], got {list(self.budgets)}")
        if self.ctx < 2:
            raise ValueError(f"ctx must be >= 2, got {self.ctx}")
        if not self.zeroc_modes or any(m not in MODES for m in self.zeroc_modes):
            raise ValueError(f"zeroc_modes must be among {', '.join(MODES)}, got {list(self.zeroc_modes)}")


@dataclass(frozen=True)
class QualityRow:
    method: str
    budget: float
    streaming_ppl: float | None  # None: the method cannot reach this budget
    full_ppl: float | None = None  # None: no full-pass form (token policies) or not reachable
    kv_fraction: float | None = None  # KV bits held / uncompressed fp16 bits (mean over steps for policies)
    kv_fraction_max: float | None = None  # largest fraction at positions >= 128 (policies)
    note: str = ""


def zeroc_models(loaded: LoadedModel, calib_file: str | Path, budgets: list[float], method: ZeroCMethod,
                 modes: tuple[str, ...] = ("fold",), progress: bool = False
                 ) -> dict[tuple[str, float], tuple[Transformer, float]]:
    """ZeroC-compressed models per mode and budget -> {(mode, budget): (model, achieved KV fraction)}.

    The same as `calibrate(loaded, calib_file, replace(method, mode=m, budget=b))` for each pair, but
    the statistics, factors and sensitivities (which do not depend on the budget) are measured once.
    """
    both = "auto" in modes or len(set(modes)) > 1
    meas = measure(loaded, calib_file, replace(method, mode="auto" if both else modes[0]), progress)
    out = {}
    for m in modes:
        for b in budgets:
            model, report = compress(loaded, meas, replace(method, mode=m, budget=b))
            out[(m, b)] = (model, report.kv_fraction)
    return out


def _policy_row(loaded: LoadedModel, tokens: torch.Tensor, name: str, budget: float, cfg: QualityConfig) -> QualityRow:
    try:
        policy = make_policy(name, budget)
    except ValueError as exc:  # e.g. KIVI 4-bit cannot go below 0.3125
        return QualityRow(name, budget, None, note=str(exc))
    r = perplexity_with_policy(loaded.model, tokens, cfg.ctx, policy, cfg.batch_size, progress=False)
    return QualityRow(name, budget, r.perplexity, None, r.kv_fraction_mean, r.kv_fraction_max)


def run_quality(loaded: LoadedModel, calib_file: str | Path, data_file: str | Path, cfg: QualityConfig,
                progress: bool = True) -> list[QualityRow]:
    """Every method at every budget of `cfg` -> rows (method, budget)."""
    if loaded.config.compression is not None:
        raise ZeroCError(f"{loaded.path}: eval quality needs the uncompressed model (this one is compressed)")
    tokens = read_eval_tokens(loaded.tokenizer, data_file, cfg.max_tokens)
    compressed_budgets = [b for b in cfg.budgets if b < 1.0]
    zeroc = [f"{ZEROC}-{m}" for m in cfg.zeroc_modes]
    jobs = 2 + len(compressed_budgets) * (len(zeroc) + len(POLICY_NAMES))
    bar = tqdm(total=jobs, desc="eval quality", unit="run", disable=not progress)
    bar.set_postfix_str("calibrating ZeroC")
    models = (zeroc_models(loaded, calib_file, compressed_budgets, cfg.calibration, cfg.zeroc_modes)
              if compressed_budgets else {})
    base_stream = perplexity_streaming(loaded.model, tokens, cfg.ctx, cfg.batch_size, progress=False).perplexity
    bar.update()
    base_full = perplexity_full(loaded.model, tokens, cfg.ctx, progress=False).perplexity
    bar.update()
    rows = []
    for b in cfg.budgets:
        rows.append(QualityRow(UNCOMPRESSED, b, base_stream, base_full, 1.0, 1.0))
        if b >= 1.0:  # every method is the identity at 1.0 (tests check each policy against this)
            rows += [QualityRow(m, b, base_stream, base_full if m in zeroc else None, 1.0, 1.0, "identity at 1.0")
                     for m in (*zeroc, *POLICY_NAMES)]
            continue
        for mode, name in zip(cfg.zeroc_modes, zeroc):
            model, fraction = models[(mode, b)]
            bar.set_postfix_str(f"{name} @ {b}")
            rows.append(QualityRow(name, b, perplexity_streaming(model, tokens, cfg.ctx, cfg.batch_size,
                                                                 progress=False).perplexity,
                                   perplexity_full(model, tokens, cfg.ctx, progress=False).perplexity, fraction,
                                   fraction))
            bar.update()
        for name in POLICY_NAMES:
            bar.set_postfix_str(f"{name} @ {b}")
            rows.append(_policy_row(loaded, tokens, name, b, cfg))
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
