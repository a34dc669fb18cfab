"""The requests of a load test, cut from real text (data/heldout.txt, never trained on).

Three shapes, scaled to the model's context (the bundled model's is 2048 tokens):
- chat: ShareGPT-like, short prompts and medium outputs (lognormal lengths, long right tail);
- long: LongBench-like, prompts near the context limit and short-to-medium outputs;
- prefix: many prompts over a few long shared prefixes (system prompts, few-shot documents),
  each with its own short suffix, so a prefix cache can reuse the shared part.
Output lengths are enforced with ignore_eos, as `vllm bench serve` does for synthetic data, so
every method generates exactly the same number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zeroc.bench.serve.load import TraceEntry
from zeroc.config import ZeroCError

WORKLOADS = ("chat", "long", "prefix")


@dataclass(frozen=True)
class LengthDist:
    """Token counts: lognormal around `median` with log-sd `sigma` (0: always the median), clipped to [lo, hi]."""

    median: int
    sigma: float
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.median <= self.hi or self.sigma < 0:
            raise ValueError(f"length distribution needs 1 <= lo <= median <= hi and sigma >= 0, got {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n] integer lengths."""
        raw = self.median * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(raw), self.lo, self.hi).astype(int)

    def capped(self, cap: int | None) -> "LengthDist":
        if cap is None:
            return self
        cap = max(1, cap)
        return LengthDist(min(self.median, cap), self.sigma, min(self.lo, cap), min(self.hi, cap))


@dataclass(frozen=True)
class WorkloadSpec:
    """What the requests look like. For `prefix`, `prompt` is each request's own suffix."""

    name: str
    prompt: LengthDist
    output: LengthDist
    shared_prefixes: int = 0
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.name!r}")
        if self.name == "prefix" and (self.shared_prefixes < 1 or self.prefix_tokens < 1):
            raise ValueError("the prefix workload needs shared_prefixes >= 1 and prefix_tokens >= 1")


def preset(name: str, ctx: int, max_prompt: int | None = None, max_output: int | None = None) -> WorkloadSpec:
    """The named workload for a model with `ctx` tokens of context, lengths optionally capped."""
    if name == "chat":  # ShareGPT's means are ~1.3:1 prompt:output, medians lower; scaled to a 2k context
        spec = WorkloadSpec("chat", LengthDist(max(8, ctx // 16), 0.8, 4, ctx // 2),
                            LengthDist(max(8, ctx // 20), 0.6, 4, ctx // 6))
    elif name == "long":  # 70-88% of the context, outputs around ctx / 16
        spec = WorkloadSpec("long", LengthDist(int(ctx * 0.8), 0.05, int(ctx * 0.7), int(ctx * 0.88)),
                            LengthDist(max(8, ctx // 16), 0.3, max(4, ctx // 32), max(8, ctx // 10)))
    elif name == "prefix":  # 4 shared prefixes of half the context, short own suffixes
        spec = WorkloadSpec("prefix", LengthDist(max(8, ctx // 40), 0.5, 4, ctx // 10),
                            LengthDist(max(8, ctx // 32), 0.5, 4, ctx // 10), shared_prefixes=4,
                            prefix_tokens=ctx // 2)
    else:
        raise ZeroCError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    prefix_tokens = spec.prefix_tokens if max_prompt is None else min(spec.prefix_tokens, max_prompt)
    return WorkloadSpec(spec.name, spec.prompt.capped(max_prompt), spec.output.capped(max_output),
                        spec.shared_prefixes, prefix_tokens)


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: prompt token ids (BOS + real text), exact output length."""

    prompt_ids: list[int]
    max_tokens: int
    prefix_id: int | None = None  # which shared prefix (prefix workload)


def text_tokens(tokenizer, path: str | Path) -> np.ndarray:
    """The token ids of a text file, without special tokens: [n]."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ZeroCError(f"cannot read {path}: {exc.strerror}") from None
    ids = np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    if ids.size < 64:
        raise ZeroCError(f"{path}: {ids.size} tokens; the workloads need at least 64")
    return ids


def _slice(tokens: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """`n` consecutive tokens from a random place in the text (wrapping round if it is short)."""
    start = int(rng.integers(0, tokens.size))
    return np.take(tokens, np.arange(start, start + n), mode="wrap").tolist()


def build_requests(spec: WorkloadSpec, tokens: np.ndarray, n: int, ctx: int, bos_id: int | None,
                   seed: int = 0, trace: list[TraceEntry] | None = None) -> list[BenchRequest]:
    """`n` requests of `spec` from `tokens` (a trace's own lengths win where it gives them).

    Every prompt + output fits `ctx` (the engine stops at the context limit)."""
    rng = np.random.default_rng(seed + 7919)
    head = [bos_id] if bos_id is not None else []
    prompt_lens, output_lens = spec.prompt.sample(rng, n), spec.output.sample(rng, n)
    prefixes = [_slice(tokens, spec.prefix_tokens, rng) for _ in range(spec.shared_prefixes)]
    out: list[BenchRequest] = []
    for i in range(n):
        p_len, o_len = int(prompt_lens[i]), int(output_lens[i])
        if trace is not None:
            p_len, o_len = trace[i].prompt_tokens or p_len, trace[i].output_tokens or o_len
        prefix_id = int(rng.integers(0, len(prefixes))) if prefixes else None
        shared = prefixes[prefix_id] if prefix_id is not None else []
        # The prompt leaves at least one position of the context for the output.
        own = max(1, min(p_len, ctx - 1 - len(head) - len(shared)))
        prompt = head + shared + _slice(tokens, own, rng)
        out.append(BenchRequest(prompt, max(1, min(o_len, ctx - len(prompt))), prefix_id))
    return out
