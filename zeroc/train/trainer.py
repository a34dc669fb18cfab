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
import math
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
from zeroc.loader import save_model
from zeroc.model import Transformer
from zeroc.tokenizer import Tokenizer
from zeroc.train.corpus import DOC_SEPARATOR, read_documents, split_corpus
from zeroc.train.synthetic import sample_batch

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


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def write_texts(split, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "heldout.txt").write_text(DOC_SEPARATOR.join(split.heldout))
    (data_dir / "calib.txt").write_text(DOC_SEPARATOR.join(split.calib))
    (data_dir / "splits.json").write_text(json.dumps(
        {"heldout": split.heldout_files, "calib": split.calib_files}, indent=2) + "\n")


def train(corpus: Path, out_dir: Path, data_dir: Path | None, cfg: TrainConfig) -> dict:
    """Train and save; returns a summary (steps, tokens seen, final loss, seconds)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = split_corpus(read_documents(corpus), cfg.heldout_bytes, cfg.calib_bytes)
    if data_dir is not None:
        write_texts(split, data_dir)
    texts = split.train + [text for root in cfg.extra_corpora for _, text in read_documents(Path(root))]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    stream = token_stream(tokenizer, texts)
    if stream.numel() <= cfg.seq_len + 1:
        raise ValueError(f"training text has {stream.numel()} tokens, fewer than seq_len + 1")
    model = Transformer(cfg.model_config(tokenizer))
    model.apply(_init_weights)
    model.to(cfg.device).init_rope()  # RoPE tables are plain attributes: recomputed on the device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.device.startswith("cuda"))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    budget_s, start = cfg.minutes * 60, time.time()
    total, step, recent, first_loss = cfg.max_steps, 0, deque(maxlen=20), None
    bar = tqdm(total=total, desc="train", unit="step")
    while step < total:
        batch = sample_batch(tokenizer, stream, cfg.batch_size, cfg.seq_len + 1, cfg.synthetic_fraction,
                             rng).to(cfg.device)  # [B, T+1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        with autocast:
            logits = model(batch[:, :-1])  # [B, T, vocab]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent.append(loss.item())
        first_loss = recent[0] if first_loss is None else first_loss
        if step == 10:  # size the cosine schedule to the time budget once the step time is known
            per_step = (time.time() - start) / step
            total = max(step + 1, min(cfg.max_steps, int(budget_s / per_step)))
            bar.total = total
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr_at(step, total, cfg):.2e}")
        bar.update(1)
    bar.close()
    model.eval().cpu().init_rope()
    save_model(model, tokenizer, out_dir, storage_dtype=torch.bfloat16)  # 25 MB instead of 50 in the repo
    summary = {"steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len,
               "train_tokens": int(stream.numel()), "first_loss": first_loss,
               "final_loss": sum(recent) / len(recent),  # mean of the last 20 steps
               "seconds": round(time.time() - start, 1),
               "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(cfg)}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _init_weights(module: torch.nn.Module) -> None:
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)
