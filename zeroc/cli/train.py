"""`zeroc train`: train the bundled model from scratch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from zeroc.train.trainer import TrainConfig, train

    cfg = TrainConfig(minutes=args.minutes, max_steps=args.max_steps, seq_len=args.seq_len,
                      batch_size=args.batch_size, hidden_size=args.hidden_size, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
                      vocab_size=args.vocab_size, lr=args.lr, seed=args.seed)
    data_dir = Path(args.data_dir) if args.data_dir else None
    summary = train(Path(args.corpus), Path(args.out), data_dir, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Train: the bundled model from a corpus."""
    p = sub.add_parser("train", help="train the bundled model (tokenizer + Llama) on a text corpus")
    p.add_argument("--corpus", default="/usr/share/doc/python3.11/html/_sources")
    p.add_argument("--out", default="models/zeroc-tiny")
    p.add_argument("--data-dir", default="data", help="where heldout.txt and calib.txt are written ('' to skip)")
    p.add_argument("--minutes", type=float, default=55.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)
