"""`zeroc eval longctx`: retrieval accuracy of every KV method at chosen budgets on synthetic long-context tasks.

Each sample (`zeroc.eval.longctx_tasks`) runs through the paged cache and store `zeroc serve` and
`zeroc eval ppl --streaming` run: its prompt is prefilled in chunks through the cache a `CacheConfig`
naming the method builds (the method compresses what it stores as it goes: eviction methods hold their
budget at every position, quantisers and Palu encode on write), then the answer is decoded greedily
through the same cache. Methods: the uncompressed cache ("uncompressed"), every method of
`zeroc.policies.registry` at the hyperparameters that hold each budget over the longest prompt
(`method_at_budget`; a budget a method cannot reach is reported as n/a), and optionally ZeroC calibrated
at each budget on the plain cache. `generate_dense` is the no-cache reference the uncompressed path must
reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from zeroc.caches import paged_cache, sequence_blocks
from zeroc.compression.calibrate import ZeroCMethod
from zeroc.config import CacheConfig, ZeroCError
from zeroc.data import read_eval_tokens
from zeroc.eval.longctx_tasks import TASKS, Sample, clip_contexts, is_correct, make_samples
from zeroc.eval.quality import zeroc_models
from zeroc.kv_cache import layer_shapes
from zeroc.loader import LoadedModel
from zeroc.model import Transformer
from zeroc.policies import POLICY_NAMES, cache_config, method_at_budget

UNCOMPRESSED, ZEROC = "uncompressed", "zeroc"


@dataclass(frozen=True)
class LongCtxConfig:
    contexts: tuple[int, ...] = (1024, 2048, 4096)  # clipped to the model's positions
    tasks: tuple[str, ...] = TASKS
    per_cell: int = 5  # samples per task and context length
    budgets: tuple[float, ...] = (1.0, 0.5, 0.25)
    methods: tuple[str, ...] = POLICY_NAMES  # registry methods; "uncompressed" always runs
    zeroc: bool = False  # also ZeroC calibrated at each budget (slow: one calibration per budget)
    seed: int = 0
    batch_size: int = 4  # samples through the cache together
    chunk: int = 512  # prefill chunk, tokens

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be in (0, 1], got {list(self.budgets)}")
        if not self.contexts or any(c < 64 for c in self.contexts):
            raise ValueError(f"contexts must be >= 64 tokens, got {list(self.contexts)}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks must be among {', '.join(TASKS)}, got {list(self.tasks)}")
        if unknown := [m for m in self.methods if m not in POLICY_NAMES]:
            raise ValueError(f"methods must be among {', '.join(POLICY_NAMES)}, got {unknown}")
        for name in ("per_cell", "batch_size", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class LongCtxRow:
    method: str
    budget: float
    task: str
    ctx: int
    correct: int
    total: int
    label: str = ""  # the method's hyperparameters at this budget
    note: str = ""  # why a budget is unreachable (then correct = total = 0)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None


@torch.inference_mode()
def generate_dense(model: Transformer, samples: list[Sample]) -> list[list[int]]:
    """Greedy continuations with a full causal forward per token (no cache): the reference."""
    device = next(model.parameters()).device
    out = []
    for s in samples:
        ids = torch.tensor(s.prompt, device=device)
        new: list[int] = []
        for _ in range(s.max_new):
            new.append(int(model(torch.cat([ids, ids.new_tensor(new)])[None])[0, -1].argmax()))
        out.append(new)
    return out


@torch.inference_mode()
def generate_paged(model: Transformer, samples: list[Sample], cache: CacheConfig | None = None,
                   batch_size: int = 4, chunk: int = 512) -> list[list[int]]:
    """Greedy continuations through the paged cache `cache` names (default: the plain one): chunked
    prefill, then one token per step, `batch_size` samples together."""
    cfg, param = model.config, next(model.parameters())
    cache = cache or CacheConfig()
    out: list[list[int]] = []
    for first in range(0, len(samples), batch_size):
        group = samples[first: first + batch_size]
        longest = max(len(s.prompt) + s.max_new for s in group)
        blocks = sequence_blocks(cfg, cache.block_size, longest, cache, param.dtype, step=chunk) * len(group)
        kv = paged_cache(layer_shapes(cfg), replace(cache, num_blocks=blocks, num_bytes=0), param.dtype,
                         param.device, model=model)
        out += _generate_group(model, kv, group, chunk)
    return out


def _generate_group(model: Transformer, kv, group: list[Sample], chunk: int) -> list[list[int]]:
    device = next(model.parameters()).device
    done = [0] * len(group)
    new: list[list[int]] = [[] for _ in group]
    while any(d < len(s.prompt) for d, s in zip(done, group)):  # chunked prefill
        live = [i for i, s in enumerate(group) if done[i] < len(s.prompt)]
        steps = [(f"s{i}", min(chunk, len(group[i].prompt) - done[i])) for i in live]
        batch = kv.schedule(steps)
        tokens = torch.tensor([t for i, (_, n) in zip(live, steps) for t in group[i].prompt[done[i]: done[i] + n]],
                              device=device)
        logits = model.forward_paged(tokens, batch.positions, batch, kv, batch.last_token_indices)  # [live, vocab]
        for row, (i, (_, n)) in enumerate(zip(live, steps)):
            done[i] += n
            if done[i] == len(group[i].prompt):
                new[i].append(int(logits[row].argmax()))
    for _ in range(max(s.max_new for s in group) - 1):  # decode
        live = [i for i, s in enumerate(group) if len(new[i]) < s.max_new]
        batch = kv.schedule([(f"s{i}", 1) for i in live])
        tokens = torch.tensor([new[i][-1] for i in live], device=device)
        logits = model.forward_paged(tokens, batch.positions, batch, kv)  # [live, vocab]
        for row, i in enumerate(live):
            new[i].append(int(logits[row].argmax()))
    for i in range(len(group)):
        kv.free(f"s{i}")
    return new


def score(loaded: LoadedModel, samples: list[Sample], generated: list[list[int]], method: str, budget: float,
          label: str = "") -> list[LongCtxRow]:
    """Correct answers per (task, ctx) cell."""
    cells: dict[tuple[str, int], list[int]] = {}
    for s, ids in zip(samples, generated):
        cell = cells.setdefault((s.task, s.ctx), [0, 0])
        cell[0] += is_correct(s, loaded.tokenizer.decode(ids))
        cell[1] += 1
    return [LongCtxRow(method, budget, t, c, ok, n, label) for (t, c), (ok, n) in cells.items()]


def build_samples(loaded: LoadedModel, data_file: str | Path, cfg: LongCtxConfig) -> list[Sample]:
    haystack = read_eval_tokens(loaded.tokenizer, data_file).tolist()[1:]  # <s> dropped: prompts add their own
    contexts = clip_contexts(cfg.contexts, loaded.config.max_position_embeddings)
    return make_samples(loaded.tokenizer, haystack, cfg.tasks, contexts, cfg.per_cell, cfg.seed)


def _registry_rows(loaded: LoadedModel, samples: list[Sample], name: str, budget: float, cfg: LongCtxConfig
                   ) -> list[LongCtxRow]:
    longest = max(len(s.prompt) + s.max_new for s in samples)
    try:
        method = method_at_budget(name, budget, loaded.config, longest)
        cache = cache_config(method)
    except ValueError as exc:  # e.g. KIVI 2-bit below its floor, int8 below 0.5
        return [LongCtxRow(name, budget, t, 0, 0, 0, note=str(exc)) for t in cfg.tasks]
    gen = generate_paged(loaded.model, samples, cache, cfg.batch_size, cfg.chunk)
    return score(loaded, samples, gen, name, budget, method.label)


def _zeroc_rows(loaded: LoadedModel, samples: list[Sample], calib_file: str | Path, cfg: LongCtxConfig,
                uncompressed: list[LongCtxRow]) -> list[LongCtxRow]:
    rows = [replace(r, method=ZEROC) for r in uncompressed if r.budget >= 1.0]
    lower = [b for b in cfg.budgets if b < 1.0]
    if not lower:
        return rows
    models = zeroc_models(loaded, calib_file, lower, ZeroCMethod(), ("auto",))
    for b in lower:
        model, fraction = models[("auto", b)]
        gen = generate_paged(model, samples, None, cfg.batch_size, cfg.chunk)
        rows += score(loaded, samples, gen, ZEROC, b, f"zeroc (KV {fraction:.3f})")
    return rows


def run_longctx(loaded: LoadedModel, data_file: str | Path, cfg: LongCtxConfig, calib_file: str | Path | None = None,
                progress: bool = True) -> list[LongCtxRow]:
    """Every method of `cfg` at every budget -> rows per (method, budget, task, ctx)."""
    if cfg.zeroc and calib_file is None:
        raise ValueError("calib_file is required when zeroc is set")
    if loaded.config.compression is not None:
        raise ZeroCError(f"{loaded.path}: eval longctx needs the uncompressed model (this one is compressed)")
    samples = build_samples(loaded, data_file, cfg)
    runs = [(m, b) for b in cfg.budgets for m in cfg.methods]
    bar = tqdm(total=1 + len(runs) + cfg.zeroc, desc="eval longctx", unit="run", disable=not progress)
    base = score(loaded, samples, generate_paged(loaded.model, samples, None, cfg.batch_size, cfg.chunk),
                 UNCOMPRESSED, 1.0, "fp16 cache")
    rows = [replace(r, budget=b) for b in cfg.budgets for r in base]
    bar.update()
    for name, b in runs:
        bar.set_postfix_str(f"{name} @ {b}")
        rows += _registry_rows(loaded, samples, name, b, cfg)
        bar.update()
    if cfg.zeroc:
        bar.set_postfix_str("zeroc")
        rows += _zeroc_rows(loaded, samples, calib_file, cfg, [r for r in rows if r.method == UNCOMPRESSED])
        bar.update()
    bar.close()
    return rows
