"""What a serving benchmark compares: KV-cache methods as data (a model directory plus serve flags).

A ZeroC method serves a calibrated copy of the model (`zeroc calibrate`, cached under the build
directory); a KV-policy baseline serves the base model with `--kv-policy ...`. The KV-policy rows
come from the method registry (`zeroc.policies.registry`): every method there is benchmarked, at
the budgets `POLICY_BUDGETS` names for it when it takes `--kv-budget`, colocated only when its KV
cannot travel, with its nominal KV fraction from its own byte maths. `all_methods()` builds them
when a benchmark runs (the method classes import torch; the CLI's parser must not).

Equal bytes: every method's decode cache gets the same capacity in bytes. A KV policy's service
converts `--cache-bytes` to blocks for its own layout; plain and ZeroC caches get `--num-blocks`
computed here from the model's per-token KV bytes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from zeroc.config import ModelConfig, ZeroCError
from zeroc.dtypes import parse_dtype
from zeroc.policies import REGISTRY

MODES = ("colocated", "disaggregated")


@dataclass(frozen=True)
class Method:
    """One KV-cache configuration under test."""

    name: str  # the label in reports
    kv_fraction: float  # nominal KV bytes per token relative to the uncompressed cache (for reading tables)
    zeroc_budget: float | None = None  # serve the model ZeroC-calibrated at this budget
    zeroc_tier: tuple[int, int] | None = None  # ... with a token tier of (sinks, recent) (`calibrate --sinks --recent`)
    serve_args: tuple[str, ...] = ()  # extra `zeroc serve prefill|decode` flags
    modes: tuple[str, ...] = MODES  # where it can run (token eviction's KV cannot travel)

    def __post_init__(self) -> None:
        if not 0 < self.kv_fraction <= 1:
            raise ValueError(f"{self.name}: kv_fraction must be in (0, 1], got {self.kv_fraction}")
        if not set(self.modes) <= set(MODES):
            raise ValueError(f"{self.name}: modes must be among {MODES}, got {self.modes}")


ZEROC_METHODS: tuple[Method, ...] = (
    Method("none", 1.0),
    Method("zeroc-0.5", 0.5, zeroc_budget=0.5),
    Method("zeroc-0.25", 0.25, zeroc_budget=0.25),
    # nominal fraction at 1024 tokens, head_dim 64: + 68 full-rank rows per sequence
    Method("zeroc-0.25-tier", 0.30, zeroc_budget=0.25, zeroc_tier=(4, 64)),
)
DEFAULT_POLICY_BUDGETS = (0.5,)
POLICY_BUDGETS = {"h2o": (0.5, 0.25)}  # budgets of a registry method that takes --kv-budget, if not the default


def policy_methods(head_dim: int = 64) -> tuple[Method, ...]:
    """A row per registry method (and budget): nominal fractions at `head_dim` (KIVI: 4-bit codes plus a 16-bit
    scale and zero point per group of 32; the runtime's cache dtype sets the real bytes, as --cache-bytes
    counts them)."""
    rows = []
    for name, entry in REGISTRY.items():
        cls = entry.method_class()
        modes = MODES if cls.transferable else ("colocated",)
        if "kv_budget" not in entry.takes:
            method = cls(**entry.fixed)
            rows.append(Method(name, method.nominal_fraction(head_dim), serve_args=("--kv-policy", name), modes=modes))
            continue
        for b in POLICY_BUDGETS.get(name, DEFAULT_POLICY_BUDGETS):
            rows.append(Method(f"{name}-{b:g}", cls(budget=b, **entry.fixed).nominal_fraction(head_dim),
                               serve_args=("--kv-policy", name, "--kv-budget", f"{b:g}"), modes=modes))
    return tuple(rows)


def all_methods() -> tuple[Method, ...]:
    """Every method a serving benchmark compares: the ZeroC rows, then the registry's KV methods."""
    return ZEROC_METHODS + policy_methods()


def method_rank(name: str) -> tuple[int, str]:
    """Sort key: `all_methods()` order, unknown names after them."""
    names = [m.name for m in all_methods()]
    return (names.index(name) if name in names else len(names), name)


def method_by_name(name: str) -> Method:
    methods = all_methods()
    for m in methods:
        if m.name == name:
            return m
    raise ZeroCError(f"unknown method {name!r}; choose among {', '.join(m.name for m in methods)}")


def uses_kv_policy(method: Method) -> bool:
    """Whether the method serves through a KV policy's store (sized by bytes, in its own block layout)."""
    return "--kv-policy" in method.serve_args


def kv_bytes_per_token(model_dir: str | Path, dtype: str = "float32") -> int:
    """Bytes one token's K and V take in the cache, summed over layers (compressed layers are narrower)."""
    path = Path(model_dir) / "config.json"
    cfg = ModelConfig.from_hf(json.loads(path.read_text()), str(path))
    itemsize = parse_dtype(dtype).itemsize
    return sum(h * (k + v) * itemsize for h, k, v in map(cfg.kv_geometry, range(cfg.num_hidden_layers)))


def capacity_args(model_dir: str | Path, cache_bytes: int, block_size: int, by_bytes: bool,
                  dtype: str = "float32") -> list[str]:
    """Decode-cache flags giving `cache_bytes` of KV memory to `model_dir`."""
    if by_bytes:
        return ["--cache-bytes", str(cache_bytes)]
    blocks = cache_bytes // (block_size * kv_bytes_per_token(model_dir, dtype))
    if blocks < 1:
        raise ZeroCError(f"{cache_bytes} bytes of KV cache hold less than one block of {model_dir}")
    return ["--num-blocks", str(blocks), "--block-size", str(block_size)]


def _stamp(base: Path, calib: Path, budget: float, tier: tuple[int, int] | None) -> str:
    from zeroc.kv_transfer import model_fingerprint

    calib_hash = hashlib.sha256(calib.read_bytes()).hexdigest()[:16]
    # The calibration code's defaults change what `zeroc calibrate` writes: a cache made by another
    # version of it is stale.
    code = hashlib.sha256()
    for src in sorted((Path(__file__).resolve().parents[1] / "compression").glob("*.py")):
        code.update(src.read_bytes())
    return (f"base={model_fingerprint(base)} calib={calib_hash} budget={budget} tier={tier} "
            f"code={code.hexdigest()[:16]}")


def prepare_model(method: Method, base_model: str | Path, calib: str | Path, build_dir: str | Path,
                  given: dict[float, str] | None = None) -> Path:
    """The model directory `method` serves: the base model; for ZeroC the directory `given` names for
    its budget, else the calibration made with `zeroc calibrate` once and reused while base model and
    calibration text match."""
    base = Path(base_model)
    if method.zeroc_budget is None:
        return base
    if given and method.zeroc_budget in given and method.zeroc_tier is None:
        out = Path(given[method.zeroc_budget])
        if not (out / "config.json").is_file():
            raise ZeroCError(f"{out}: no config.json (given as the ZeroC model for budget {method.zeroc_budget:g})")
        return out
    tier = method.zeroc_tier
    out = Path(build_dir) / (f"{base.name}-zeroc-{method.zeroc_budget:g}" + (f"-tier{tier[0]}-{tier[1]}" if tier else ""))
    stamp_file = out / "bench-source.txt"
    stamp = _stamp(base, Path(calib), method.zeroc_budget, tier)
    if (out / "config.json").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return out
    cmd = [sys.executable, "-m", "zeroc.cli", "calibrate", "--model", str(base), "--calib", str(calib),
           "--budget", str(method.zeroc_budget), "--out", str(out), "--json"]
    if tier:
        cmd += ["--sinks", str(tier[0]), "--recent", str(tier[1])]
    print(f"calibrating {method.name} -> {out} (once; reused by later runs)", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ZeroCError(f"zeroc calibrate for {method.name} failed: {done.stderr.strip()[-2000:]}")
    stamp_file.write_text(stamp)
    return out
