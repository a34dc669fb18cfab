"""`zeroc train`: train the bundled model from scratch (optionally with the long-context recipe)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# flag -> TrainConfig field; a flag left unset keeps the recipe's (or TrainConfig's) value
_FIELDS = {"minutes": "minutes", "max_steps": "max_steps", "seq_len": "seq_len", "batch_size": "batch_size",
           "hidden_size": "hidden_size", "layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads",
           "head_dim": "head_dim", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size", "lr": "lr",
           "seed": "seed", "max_positions": "max_position_embeddings", "rope_theta": "rope_theta",
           "synthetic_fraction": "synthetic_fraction", "threads": "threads", "device": "device",
           "warmup_steps": "warmup_steps", "init_from": "init_from", "answer_weight": "answer_weight",
           "log_every": "log_every", "checkpoint_minutes": "checkpoint_minutes"}
_DEFAULTS = dict(minutes=55.0, seq_len=1024, batch_size=4, lr=1.5e-3)  # the bundled model's run


def train_config(args: argparse.Namespace):
    from zeroc.train.recipe import PRESETS, extra_corpora
    from zeroc.train.trainer import TrainConfig

    fields = dict(_DEFAULTS) if args.recipe is None else dict(PRESETS[args.recipe])
    fields.update({f: getattr(args, flag) for flag, f in _FIELDS.items() if getattr(args, flag) is not None})
    if args.curriculum is not None:
        fields["curriculum"] = parse_curriculum(args.curriculum)
    if args.kind_weights is not None:
        fields["kind_weights"] = parse_kind_weights(args.kind_weights)
    extra = list(args.extra_corpus)
    if args.recipe is not None and args.corpus_root:
        extra += extra_corpora(args.corpus_root)
    return TrainConfig(**fields, extra_corpora=tuple(extra))


def parse_curriculum(text: str) -> tuple[tuple[float, int], ...]:
    """"0:256,0.3:512,0.6:2048" -> ((0.0, 256), (0.3, 512), (0.6, 2048)); "" -> no curriculum."""
    try:
        return tuple((float(a), int(b)) for a, b in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise ValueError(f"curriculum must look like 0:256,0.3:512,0.6:2048, got {text!r}") from None


def parse_kind_weights(text: str) -> tuple[float, ...]:
    """"repeat=3,kv=2" -> a weight per synthetic kind in KINDS order, 1 where unnamed; "" -> alike."""
    from zeroc.train.synthetic import KINDS

    if not text:
        return ()
    try:
        named = {k: float(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise ValueError(f"kind weights must look like repeat=3,kv=2, got {text!r}") from None
    if set(named) - set(KINDS):
        raise ValueError(f"unknown synthetic kinds {sorted(set(named) - set(KINDS))}; known: {', '.join(KINDS)}")
    return tuple(named.get(k, 1.0) for k in KINDS)


def cmd_train(args: argparse.Namespace) -> int:
    from zeroc.train.recipe import main_corpus
    from zeroc.train.trainer import train

    cfg = train_config(args)
    corpus = args.corpus or (main_corpus(args.corpus_root) if args.corpus_root
                             else "/usr/share/doc/python3.11/html/_sources")
    data_dir = Path(args.data_dir) if args.data_dir else None
    summary = train(Path(corpus), Path(args.out), data_dir, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Train: the bundled model from a corpus."""
    from zeroc.train.recipe import PRESETS

    p = sub.add_parser("train", help="train the bundled model (tokenizer + Llama) on a text corpus")
    p.add_argument("--recipe", choices=sorted(PRESETS), default=None,
                   help="the long-context recipe's model and data mix (docs/data.md); flags override it")
    p.add_argument("--corpus-root", default="",
                   help="where tools/fetch_train_corpus.sh unpacked the recipe's Debian packages")
    p.add_argument("--corpus", default=None, help="main corpus (default: python3.11-doc's sources)")
    p.add_argument("--extra-corpus", nargs="*", default=[], help="more text for the training split only")
    p.add_argument("--out", default="models/zeroc-tiny")
    p.add_argument("--data-dir", default="data", help="where heldout.txt and calib.txt are written ('' to skip)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (default 55)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden size / heads")
    p.add_argument("--max-positions", type=int, default=None)
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--synthetic-fraction", type=float, default=None,
                   help="share of sequences that are synthetic long-range tasks")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--init-from", default=None,
                   help="continue training this model directory (keeps its tokenizer and architecture)")
    p.add_argument("--answer-weight", type=float, default=None,
                   help="extra loss weight on the synthetic tasks' answer tokens (0: plain next-token loss)")
    p.add_argument("--kind-weights", default=None,
                   help="how often each synthetic kind is drawn, e.g. repeat=3,kv=2 (unnamed kinds 1)")
    p.add_argument("--curriculum", default=None,
                   help="length curriculum, progress:seq_len stages, e.g. 0:256,0.3:512,0.6:2048 ('' for none)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    p.add_argument("--checkpoint-minutes", type=float, default=None,
                   help="save the model every so many minutes while training")
    p.set_defaults(func=cmd_train)
