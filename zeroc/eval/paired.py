"""Paired differences between two methods scored on the same windows, with their standard error.

Both methods score the same windows of the same text, so the per-window difference of their mean NLL
removes the variation between windows (an easy window is easy for both). The mean difference is
token-weighted, so exp(mean) is exactly the ratio of the two perplexities; its standard error is the
ratio estimator's over windows (with equal windows: the sample standard deviation of the differences
over sqrt(n)). A difference within 2 standard errors of zero is a tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

TIE_SE = 2.0  # a difference within this many standard errors of zero is reported as a tie
# Below this (nats per token, 1e-4 % of perplexity) a difference is float rounding between two computations of
# the same thing (e.g. a method at budget 1 against the plain cache), whatever its standard error says.
ROUNDING = 1e-6


@dataclass(frozen=True)
class PairedDiff:
    mean: float  # token-weighted mean of (a - b) per-window mean NLL, nats
    se: float | None  # its standard error (None: fewer than 2 windows)
    windows: int

    @property
    def pct(self) -> float:
        """Perplexity change of a relative to b, in percent."""
        return 100.0 * math.expm1(self.mean)

    @property
    def se_pct(self) -> float | None:
        """The standard error of `pct` (delta method)."""
        return None if self.se is None else 100.0 * math.exp(self.mean) * self.se

    @property
    def tie(self) -> bool:
        if abs(self.mean) < ROUNDING:
            return True
        return self.se is not None and abs(self.mean) <= TIE_SE * self.se

    def describe(self) -> str:
        """E.g. "+0.42% ± 0.10" or "+0.05% ± 0.08 (tie)"."""
        se = "" if self.se_pct is None else f" ± {self.se_pct:.2f}"
        return f"{self.pct:+.2f}%{se}" + (" (tie)" if self.tie else "")


def paired_difference(a: Sequence[float], b: Sequence[float], tokens: Sequence[int]) -> PairedDiff:
    """a, b: mean NLL per window of two methods on the same windows; tokens: the tokens each window scores."""
    if not (len(a) == len(b) == len(tokens)) or not a:
        raise ValueError(f"a, b and tokens must be equally long and non-empty, got {len(a)}, {len(b)}, {len(tokens)}")
    if any(n <= 0 for n in tokens):
        raise ValueError("tokens must be positive")
    total = float(sum(tokens))
    d = [x - y for x, y in zip(a, b)]
    mean = sum(n * x for n, x in zip(tokens, d)) / total
    n = len(d)
    if n < 2:
        return PairedDiff(mean, None, n)
    var = sum((w * (x - mean)) ** 2 for w, x in zip(tokens, d)) / total ** 2 * n / (n - 1)
    return PairedDiff(mean, math.sqrt(var), n)
