"""Train the bundled model: a BPE tokenizer, then a small Llama on a time budget.

`zeroc train` runs `train()`: split the corpus, train the tokenizer, tokenize, run AdamW with
warmup + cosine decay sized to the time budget, and save a Hugging Face model directory
together with the held-out and calibration texts.

The long-context recipe (docs/data.md) adds, to the training split only, more documentation text
(`TrainConfig.extra_corpora`, e.g. Debian documentation packages unpacked by
tools/fetch_train_corpus.sh) and a fraction of synthetic long-range sequences
(`TrainConfig.synthetic_fraction`, `zeroc.train.synthetic`); the held-out and calibration texts still
come from the main corpus alone.
"""

from __future__ import annotations

import json
import copy
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from zeroc.config import ModelConfig, RopeConfig
from zeroc.loader import load_model, save_model
from zeroc.model import Transformer
from zeroc.tokenizer import Tokenizer
from zeroc.train.corpus import DOC_SEPARATOR, read_documents, split_corpus
from zeroc.train.schedule import check_curriculum, lr_at, progress, stage_at
from zeroc.train.synthetic import KINDS, Batch, check_kind_weights, sample_batch

BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of the bundled model and its training run."""

    vocab_size: int = 8192
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    seq_len: int = 1024
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_steps: int = 100_000
    minutes: float = 60.0
    heldout_bytes: int = 250_000
    calib_bytes: int = 250_000
    seed: int = 0
    threads: int = 0  # 0: torch's default
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    synthetic_fraction: float = 0.0  # share of training sequences that are synthetic long-range tasks
    extra_corpora: tuple[str, ...] = ()  # more text for the training split only (directories or files)
    device: str = "cpu"  # "cuda": bf16 autocast, fp32 master weights
    init_from: str = ""  # a model directory to continue from (its tokenizer and architecture; fields above unused)
    kind_weights: tuple[float, ...] = ()  # per synthetic kind (synthetic.KINDS order); () draws them alike
    answer_weight: float = 0.0  # loss = next-token loss + answer_weight * mean loss on the synthetic answers' tokens
    curriculum: tuple[tuple[float, int], ...] = ()  # (progress at which a stage starts, seq_len); see schedule.py
    log_every: int = 10  # steps between log lines (and entries of training.json's "log")
    checkpoint_minutes: float = 0.0  # > 0: save the model every so many minutes, so a cut-short run leaves one

    def __post_init__(self) -> None:
        if not self.head_dim and self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads (or set head_dim)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError("seq_len must not exceed max_position_embeddings")
        if self.minutes <= 0 or self.max_steps <= 0:
            raise ValueError("minutes and max_steps must be positive")
        if self.answer_weight < 0:
            raise ValueError(f"answer_weight must be >= 0, got {self.answer_weight}")
        check_curriculum(self.curriculum, self.seq_len)
        check_kind_weights(self.kind_weights)

    def model_config(self, tokenizer: Tokenizer) -> ModelConfig:
        return ModelConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim or self.hidden_size // self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope=RopeConfig(theta=self.rope_theta),
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
        )


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE; encode() prepends <s> like Llama tokenizers do."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return Tokenizer(backend, BOS, EOS)


def token_stream(tokenizer: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream: <s> doc </s> <s> doc </s> ... -> [n_tokens]"""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def write_texts(split, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "heldout.txt").write_text(DOC_SEPARATOR.join(split.heldout))
    (data_dir / "calib.txt").write_text(DOC_SEPARATOR.join(split.calib))
    (data_dir / "splits.json").write_text(json.dumps(
        {"heldout": split.heldout_files, "calib": split.calib_files}, indent=2) + "\n")


def _prepare(corpus: Path, data_dir: Path | None, cfg: TrainConfig) -> tuple[Tokenizer, torch.Tensor, Transformer]:
    """The tokenizer, the training stream ([n] ids) and the model: new ones, or those of `cfg.init_from`."""
    split = split_corpus(read_documents(corpus), cfg.heldout_bytes, cfg.calib_bytes)
    if data_dir is not None:
        write_texts(split, data_dir)
    texts = split.train + [text for root in cfg.extra_corpora for _, text in read_documents(Path(root))]
    if cfg.init_from:
        loaded = load_model(cfg.init_from, dtype=torch.float32)
        tokenizer, model = loaded.tokenizer, loaded.model.requires_grad_(True)
    else:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        model = Transformer(cfg.model_config(tokenizer))
        model.apply(init_weights)
    longest = max([cfg.seq_len] + [n for _, n in cfg.curriculum])
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {longest} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    stream = token_stream(tokenizer, texts)
    if stream.numel() <= longest + 1:
        raise ValueError(f"training text has {stream.numel()} tokens, fewer than seq_len + 1")
    model.to(cfg.device).init_rope()  # RoPE tables are plain attributes: recomputed on the device
    return tokenizer, stream, model.train()


def batch_loss(model: Transformer, batch: Batch, answer_weight: float, autocast) -> tuple[torch.Tensor, dict]:
    """Next-token loss plus answer_weight times the answer tokens' mean loss; also each synthetic row's
    greedy exactness (every answer token the argmax: what greedy decoding after the cue would write).
    -> (loss, {"lm": float, "answer": float, "exact": {kind: [right, rows]}})"""
    ids, mask = batch.ids, batch.answer_mask[:, 1:]  # [B, T+1], [B, T] (aligned with the targets)
    with autocast:
        logits = model(ids[:, :-1])  # [B, T, vocab]
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T]
    lm = ce.mean()
    answer = (ce * mask).sum() / mask.sum().clamp(min=1)
    right = (logits.detach().argmax(-1) == ids[:, 1:]) | ~mask  # [B, T]
    exact: dict[str, list[int]] = {}
    for kind, ok in zip(batch.kinds, right.all(dim=1).tolist()):
        if kind:
            exact.setdefault(kind, [0, 0])
            exact[kind][0] += int(ok)
            exact[kind][1] += 1
    return lm + answer_weight * answer, {"lm": lm.item(), "answer": answer.item(), "exact": exact}


class _Log:
    """Running means over the last `log_every` steps, written as lines and kept for training.json."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.loss, self.lm, self.answer, self.n = 0.0, 0.0, 0.0, 0
        self.exact = {k: [0, 0] for k in KINDS}

    def add(self, loss: float, stats: dict) -> None:
        self.loss, self.lm, self.answer, self.n = self.loss + loss, self.lm + stats["lm"], \
            self.answer + stats["answer"], self.n + 1
        for kind, (ok, rows) in stats["exact"].items():
            self.exact[kind][0] += ok
            self.exact[kind][1] += rows

    def flush(self, step: int, seconds: float, seq_len: int, lr: float) -> str:
        entry = {"step": step, "minutes": round(seconds / 60, 2), "seq_len": seq_len, "lr": lr,
                 "loss": self.loss / self.n, "lm_loss": self.lm / self.n, "answer_loss": self.answer / self.n,
                 "exact": {k: round(ok / rows, 3) for k, (ok, rows) in self.exact.items() if rows}}
        self.entries.append(entry)
        self._reset()
        exact = " ".join(f"{k}={v:.2f}" for k, v in entry["exact"].items())
        return (f"step {step} {entry['minutes']:.1f} min len {seq_len} lm {entry['lm_loss']:.3f} "
                f"answer {entry['answer_loss']:.3f} exact {exact}")


def train(corpus: Path, out_dir: Path, data_dir: Path | None, cfg: TrainConfig) -> dict:
    """Train and save; returns a summary (steps, tokens seen, final loss, seconds, the log)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer, stream, model = _prepare(corpus, data_dir, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.device.startswith("cuda"))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng, log = random.Random(cfg.seed), _Log()
    start, step, tokens, recent, first_loss = time.time(), 0, 0, deque(maxlen=20), None
    saved_at, frac = start, 0.0
    bar = tqdm(total=100, desc="train", unit="%")
    while frac < 1.0:
        seq_len, batch_size = stage_at(frac, cfg.curriculum, cfg.seq_len, cfg.batch_size)
        batch = sample_batch(tokenizer, stream, batch_size, seq_len + 1, cfg.synthetic_fraction, rng,
                             cfg.kind_weights)
        batch = Batch(batch.ids.to(cfg.device), batch.answer_mask.to(cfg.device), batch.kinds)
        lr = lr_at(frac, step, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, stats = batch_loss(model, batch, cfg.answer_weight, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, tokens = step + 1, tokens + batch_size * seq_len
        recent.append(stats["lm"])
        first_loss = recent[0] if first_loss is None else first_loss
        log.add(loss.item(), stats)
        if step % cfg.log_every == 0:
            tqdm.write(log.flush(step, time.time() - start, seq_len, lr))
        if cfg.checkpoint_minutes and time.time() - saved_at > cfg.checkpoint_minutes * 60:
            _save(model, tokenizer, out_dir, cfg, _summary(step, tokens, stream, first_loss, recent, start, log))
            saved_at = time.time()
        frac = progress(step, cfg.max_steps, time.time() - start, cfg.minutes * 60)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr:.2e}", len=seq_len)
        bar.update(round(100 * frac) - bar.n)
    bar.close()
    summary = _summary(step, tokens, stream, first_loss, recent, start, log)
    _save(model, tokenizer, out_dir, cfg, summary)
    return summary


def _summary(step: int, tokens: int, stream: torch.Tensor, first_loss: float | None, recent: deque,
             start: float, log: _Log) -> dict:
    return {"steps": step, "tokens_seen": tokens, "train_tokens": int(stream.numel()), "first_loss": first_loss,
            "final_loss": sum(recent) / len(recent),  # next-token loss, mean of the last 20 steps
            "seconds": round(time.time() - start, 1), "log": log.entries}


def _save(model: Transformer, tokenizer: Tokenizer, out_dir: Path, cfg: TrainConfig, summary: dict) -> None:
    """bf16 weights (half the bytes in the repository) and training.json; the model trains on afterwards."""
    cpu = copy.deepcopy(model).eval().cpu()
    cpu.init_rope()
    save_model(cpu, tokenizer, out_dir, storage_dtype=torch.bfloat16)
    summary = dict(summary, parameters=sum(p.numel() for p in model.parameters()), config=asdict(cfg))
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


def init_weights(module: torch.nn.Module) -> None:
    """N(0, 0.02) weights, zero biases: the initialisation of every model `zeroc train` starts from scratch."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)
