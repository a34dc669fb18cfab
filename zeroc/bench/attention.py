"""`zeroc bench attention`: attention-block time, uncompressed vs ZeroC (fold, rotate) vs KIVI 4-bit.

The block is the model's own `Attention` module (QKV projection, RoPE, the rotate-mode bases,
attention through the paged cache, O projection) with random weights of a given shape, timed on
this machine for a prefill (one sequence) and a decode step (a batch of sequences that each hold
`context` tokens). All methods run the same code path and the same attention (the runtime's
`PagedAttend`); what differs is:

- uncompressed: head_dim-wide q/k/v and cache.
- zeroc-fold: q/k keep `rank` dims (RoPE pairs), v/o `rank` dims; a narrower GEMM and cache.
- zeroc-rotate: q/k projected at full width, RoPE, then the per-KV-head bases to `rank` dims;
  v/o `rank` dims.
- kivi-4: uncompressed projections; the cache holds 4-bit codes (keys per channel over groups of
  32 tokens, values per token over groups of 32 channels, fp16 scale and zero point per group).
  Prefill attends in full precision and quantises everything it writes; a decode step
  dequantises the whole context before attention (there is no fused dequantise-attention kernel
  on the CPU), keeps the new token at full precision (KIVI's residual), and pays 1/32 of the
  quantisation of one key/value group (done once every 32 steps).

Methods are timed round-robin, `repeats` times each after one warm-up, so load on a shared
machine hits all of them alike. The reported time is the best of the repeats (the least disturbed
by other processes; the median is kept beside it), on `threads` threads (default 1: on a shared,
oversubscribed machine multi-threaded ops stall on their slowest thread).
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from zeroc_kernels.attention import TorchBackend
from zeroc.bench.forward import machine_description
from zeroc.config import AttentionCompression, CacheConfig, LayerCompression, ModelConfig
from zeroc.kv_cache import PagedBatch, PagedKVCache, layer_shapes
from zeroc.attend import CallerAttend, PagedAttend
from zeroc.model import Attention
from zeroc.rope import RopeTables

METHODS = ("uncompressed", "zeroc-fold", "zeroc-rotate", "kivi-4")
KIVI_BITS, KIVI_GROUP = 4, 32


@dataclass(frozen=True)
class BlockShape:
    """The attention geometry of one model layer."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


LLAMA3_8B = BlockShape("llama3-8b", 4096, 32, 8, 128)


def bundled_shape() -> BlockShape:
    from zeroc.config import BUNDLED_MODEL
    from zeroc.loader import read_config

    cfg = read_config(BUNDLED_MODEL)
    return BlockShape("zeroc-tiny", cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)


@dataclass(frozen=True)
class AttentionBenchConfig:
    prefill_tokens: int = 2048
    decode_batch: int = 16
    context: int = 2048  # tokens each decoding sequence already holds
    rank_ratio: float = 0.5  # ZeroC Q/K and V ranks as a fraction of head_dim
    repeats: int = 5
    threads: int = 1
    block_size: int = 32  # one KIVI key group per block

    def __post_init__(self) -> None:
        if min(self.prefill_tokens, self.decode_batch, self.context, self.repeats, self.threads) < 1:
            raise ValueError("prefill_tokens, decode_batch, context, repeats and threads must be >= 1")
        if not 0.0 < self.rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}")
        if self.block_size != KIVI_GROUP:
            raise ValueError(f"block_size must be {KIVI_GROUP} (one KIVI key group per block)")

    def rank(self, head_dim: int) -> int:
        """ZeroC rank for `head_dim`: the ratio rounded down to whole RoPE pairs, at least one pair."""
        return max(2, int(self.rank_ratio * head_dim) // 2 * 2)


@dataclass(frozen=True)
class BenchRow:
    shape: str
    phase: str  # "prefill" | "decode"
    method: str
    ms: float  # best of the repeats, per block call
    ms_median: float
    ratio: float  # ms / uncompressed ms, same shape and phase
    kv_fraction: float  # cache bytes per token / uncompressed fp16


# -- KIVI 4-bit: quantise into packed codes, dequantise -------------------------------------------

def _quantize(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """4-bit asymmetric codes along `dim` (one fp16 scale and zero per slice), two codes per byte.

    x: [..., d] with d even -> (codes uint8 [..., d/2], scale fp16, zero fp16 with `dim` kept as size 1)
    """
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** KIVI_BITS - 1)).clamp(min=1e-8)
    codes = ((x - lo) / scale).round_().clamp_(0, 2 ** KIVI_BITS - 1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale.half(), lo.half()


def _unpack(codes: Tensor) -> Tensor:
    # codes: [..., d/2] uint8 -> [..., d] float32 code values
    return torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2).float()


def quantize_keys(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel over groups of 32 tokens. k: [blocks, 32, kv, d] -> codes [blocks, 32, kv, d/2],
    scale and zero [blocks, 1, kv, d]."""
    return _quantize(k, 1)


def dequantize_keys(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return _unpack(codes) * scale.float() + zero.float()


def quantize_values(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per token over groups of 32 channels. v: [..., kv, d] -> codes [..., kv, d/2], scale and zero
    [..., kv, d/32, 1]."""
    codes, scale, zero = _quantize(v.unflatten(-1, (-1, KIVI_GROUP)), -1)
    return codes.flatten(-2), scale, zero


def dequantize_values(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    vals = _unpack(codes).unflatten(-1, (-1, KIVI_GROUP))
    return (vals * scale.float() + zero.float()).flatten(-2)


class KiviPools:
    """4-bit code pools shaped like the paged cache's (one key group per block)."""

    def __init__(self, k_pool: Tensor, v_pool: Tensor):
        # k_pool, v_pool: [blocks, 32, kv, d] full-precision pools whose shapes the codes mirror
        self.k = quantize_keys(k_pool)
        self.v = quantize_values(v_pool)

    def write_prefill(self, k_pool: Tensor, v_pool: Tensor) -> None:
        """Quantise every block of the full-precision pools into the codes (a prefill's whole cache)."""
        for dst, src in zip(self.k + self.v, quantize_keys(k_pool) + quantize_values(v_pool)):
            dst.copy_(src)

    def dequantize_into(self, k_pool: Tensor, v_pool: Tensor) -> None:
        k_pool.copy_(dequantize_keys(*self.k))
        v_pool.copy_(dequantize_values(*self.v))


# -- the timed blocks --------------------------------------------------------------------------------

def _model_config(shape: BlockShape, method: str, rank: int) -> ModelConfig:
    d, kv = shape.head_dim, shape.kv_heads
    comp = None
    if method == "zeroc-fold":
        comp = LayerCompression(tuple(tuple(range(rank // 2)) for _ in range(kv)), rank)
    elif method == "zeroc-rotate":
        comp = LayerCompression((), rank, "rotate", rank)
    return ModelConfig(vocab_size=2, hidden_size=shape.hidden, intermediate_size=1, num_hidden_layers=1,
                       num_attention_heads=shape.heads, num_key_value_heads=kv, head_dim=d,
                       max_position_embeddings=1 << 20,
                       compression=AttentionCompression((comp,), "bench", rank / d) if comp else None)


def _attention(cfg: ModelConfig, gen: torch.Generator) -> Attention:
    attn = Attention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return attn.eval().requires_grad_(False)


def kv_fraction(method: str, shape: BlockShape, rank: int) -> float:
    """Cache bytes per token as a fraction of uncompressed fp16 (KIVI: codes plus group metadata)."""
    if method == "uncompressed":
        return 1.0
    if method == "kivi-4":
        return (KIVI_BITS + 2 * 16 / KIVI_GROUP) / 16
    return rank / shape.head_dim


@dataclass(frozen=True)
class _Setup:
    run: Callable[[], object]  # one block call
    every_32: Callable[[], object] | None = None  # work done once per 32 calls (KIVI decode); 1/32 is added


def _block(cfg: ModelConfig, shape: BlockShape, method: str, bench: AttentionBenchConfig, phase: str,
           gen: torch.Generator) -> _Setup:
    attn = _attention(cfg, gen)
    seqs, new, ctx = ((1, bench.prefill_tokens, 0) if phase == "prefill"
                      else (bench.decode_batch, 1, bench.context))
    blocks_per_seq = -(-(ctx + new) // bench.block_size)
    cache = PagedKVCache(layer_shapes(cfg), CacheConfig(bench.block_size, seqs * blocks_per_seq), torch.float32)
    if ctx:  # the context is already cached: random K/V in its slots
        cache.schedule([(f"s{i}", ctx) for i in range(seqs)])
        for pool in cache.layer(0):
            pool.normal_(generator=gen)
    batch = cache.schedule([(f"s{i}", new) for i in range(seqs)])
    x = torch.randn(seqs * new, shape.hidden, generator=gen)  # [N, hidden]
    attend, every_32 = _paged_attend(cache, batch), None
    if method == "kivi-4":
        fn, every_32 = _kivi(cache, batch, phase, seqs)
        attend = CallerAttend(fn)

    @torch.inference_mode()
    def run() -> Tensor:
        return attn(0, x, RopeTables(batch.positions), attend)

    return _Setup(run, every_32)


def _paged_attend(cache: PagedKVCache, batch: PagedBatch) -> PagedAttend:
    """The runtime's attention step (as `Transformer.forward_paged` does it on the CPU): write, then attend."""
    return PagedAttend(cache, batch, TorchBackend())


def _kivi(cache: PagedKVCache, batch: PagedBatch, phase: str, seqs: int):
    full, (k_pool, v_pool) = _paged_attend(cache, batch), cache.layer(0)
    kivi = KiviPools(k_pool, v_pool)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        if phase == "prefill":  # attend in full precision, then store the cache as codes
            out = full(layer, q, k, v, scale)
            kivi.write_prefill(k_pool, v_pool)
            return out
        kivi.dequantize_into(k_pool, v_pool)  # the context, as attention needs it
        return full(layer, q, k, v, scale)  # the new token joins in full precision (the residual)

    def quantize_one_group() -> None:  # decode: 32 residual tokens per sequence become codes
        group = k_pool[:seqs]  # [seqs, 32, kv, d]: one block of 32 tokens per sequence
        quantize_keys(group)
        quantize_values(v_pool[:seqs])

    return attend, (quantize_one_group if phase == "decode" else None)


def _time_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run_attention_bench(bench: AttentionBenchConfig, shapes: list[BlockShape], progress: bool = True) -> dict:
    """Every method on every shape, prefill and decode -> {"rows": [BenchRow as dict], machine, date, config}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(bench.threads)
    try:
        return _run(bench, shapes, progress)
    finally:
        torch.set_num_threads(threads)


def _run(bench: AttentionBenchConfig, shapes: list[BlockShape], progress: bool) -> dict:
    jobs = [(shape, phase) for shape in shapes for phase in ("prefill", "decode")]
    bar = tqdm(total=len(jobs) * len(METHODS) * (bench.repeats + 1), desc="bench attention", unit="call",
               disable=not progress)
    rows: list[BenchRow] = []
    for shape, phase in jobs:
        rank = bench.rank(shape.head_dim)
        gen = torch.Generator().manual_seed(0)
        setups = {m: _block(_model_config(shape, m, rank), shape, m, bench, phase, gen) for m in METHODS}
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for rep in range(bench.repeats + 1):  # round 0 warms up and is not counted
            for m, setup in setups.items():
                bar.set_postfix_str(f"{shape.name} {phase} {m}")
                ms = _time_ms(setup.run) + (_time_ms(setup.every_32) / KIVI_GROUP if setup.every_32 else 0.0)
                if rep:
                    times[m].append(ms)
                bar.update()
        base = min(times["uncompressed"])
        for m in METHODS:
            rows.append(BenchRow(shape.name, phase, m, min(times[m]), statistics.median(times[m]),
                                 min(times[m]) / base, kv_fraction(m, shape, rank)))
        del setups
    bar.close()
    return {"machine": f"{machine_description()} (of {os.cpu_count()} CPUs)", "date": dt.date.today().isoformat(), "config": asdict(bench),
            "shapes": [asdict(s) for s in shapes], "rows": [asdict(r) for r in rows]}


def text_report(report: dict) -> str:
    """The rows as one markdown table: a line per shape and phase, ms and ratio per method."""
    cfg = report["config"]
    lines = [f"{report['machine']}, {report['date']}: prefill {cfg['prefill_tokens']} tokens; decode batch "
             f"{cfg['decode_batch']} x context {cfg['context']}; ZeroC rank ratio {cfg['rank_ratio']}; best of "
             f"{cfg['repeats']}",
             "| shape | phase | " + " | ".join(f"{m} ms" for m in METHODS) + " | "
             + " | ".join(f"{m} / uncompressed" for m in METHODS[1:]) + " |",
             "|---|---|" + "---:|" * (2 * len(METHODS) - 1)]
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for r in report["rows"]:
        by_key.setdefault((r["shape"], r["phase"]), {})[r["method"]] = r
    for (shape, phase), row in by_key.items():
        lines.append(f"| {shape} | {phase} | " + " | ".join(f"{row[m]['ms']:.1f}" for m in METHODS) + " | "
                     + " | ".join(f"{row[m]['ratio']:.2f}" for m in METHODS[1:]) + " |")
    return "\n".join(lines)
