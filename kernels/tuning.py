"""Autotuning shared by the attention kernels: tuned on a GPU, one fixed config in the interpreter.

Each kernel has a list of `triton.Config`s (tile sizes, warps, pipeline stages). On a GPU the first
call for a new key (the shape class: group size, head widths, page size, int8, dtypes) times every
config and keeps the fastest. With `cache_results` (Triton >= 3.3) Triton also writes the timings
to its cache directory (TRITON_CACHE_DIR, ~/.triton/cache by default), keyed by the kernel's source,
the device target and the tuning key, so a restarted service reads the choice instead of re-timing.
Under TRITON_INTERPRET=1 timing means nothing and would multiply test time: the first config runs.
A caller can also name the config (tests run every one; benchmarks time them).
"""

from __future__ import annotations

import inspect
import os

try:  # optional on CPU-only machines
    import triton
except ImportError:  # pragma: no cover
    triton = None


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuned(kernel, configs: list, key: list[str]):
    """`kernel` wrapped in `triton.autotune` over `configs`, the timings persisted where supported."""
    extra = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **extra)(kernel)


def launch(kernel, tuned, grid, args: tuple, kwargs: dict, configs: list, config=None) -> None:
    """Run `kernel` with `config` (a triton.Config); none given: the autotuned wrapper `tuned` on a GPU,
    the first of `configs` in the interpreter."""
    if config is None and interpreting():
        config = configs[0]
    if config is None:
        tuned[grid](*args, **kwargs)
        return
    kernel[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def bucket(x: int, lo: int, hi: int, step: int = 4) -> int:
    """The smallest lo * step**k >= x, clamped to [lo, hi]: a coarse size class for an autotuning key, so a
    tiny first call does not choose the tiles for large ones, and a service re-tunes only a few times."""
    b = lo
    while b < min(x, hi):
        b *= step
    return min(b, hi)


def describe(config) -> dict:
    """A config as plain data (benchmark reports)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_id(config) -> str:
    """A short name for a config, e.g. "BLOCK_N128-w4-s3" (test ids, benchmark rows)."""
    tiles = "-".join(f"{k}{v}" for k, v in config.kwargs.items())
    return f"{tiles}-w{config.num_warps}-s{config.num_stages}"


def chosen(tuned, configs: list) -> dict | None:
    """The config the autotuned wrapper `tuned` ran last (the first of `configs` in the interpreter)."""
    if interpreting():
        return describe(configs[0])
    best = getattr(tuned, "best_config", None)
    return describe(best) if best is not None else None
