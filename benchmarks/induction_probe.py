"""How many steps a Llama-shaped model needs to form an induction head, on this machine.

    python benchmarks/induction_probe.py [--offset random|fixed] [--seconds 900] [--hidden 256] [--layers 4]
                                         [--heads 4] [--kv-heads 4] [--rows 12] [--span 48] [--length 192]
                                         [--lr 1e-3] [--device cpu] [--json FILE]

Each row holds `--length` tokens drawn uniformly from the vocabulary, with a span of `--span` of them
repeated later in the row. Only the repeat is predictable, and only by copying; its loss is printed
against the rest's every 25 steps. `--offset random` puts the copy at a random distance after the span,
so a head must match content (the induction circuit that retrieval needs); `--offset fixed` puts it right
after, which a head that looks back a fixed distance solves (a control: it shows the loop learns).

A model has formed the circuit when the copy's loss leaves chance (ln vocab) by a wide margin; the script
reports the first step where it falls below half of chance, or none. docs/data.md records the CPU runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from zeroc.config import ModelConfig, RopeConfig
from zeroc.model import Transformer
from zeroc.train.trainer import init_weights

VOCAB = 8192  # the bundled tokenizer's size; ids 0 and 1 (<s>, </s>) are never drawn


def rows(gen: torch.Generator, n: int, length: int, span: int, offset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of uniform tokens with one span repeated. -> ids [n, length], copy mask [n, length - 1]:
    True where the target (the next token) is a copied token that the copy's own first token precedes."""
    ids = torch.randint(2, VOCAB, (n, length), generator=gen)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for b in range(n):
        if offset == "fixed":
            s, e = 0, span
        else:
            s = int(torch.randint(0, length - 2 * span + 1, (), generator=gen))
            e = int(torch.randint(s + span, length - span + 1, (), generator=gen))
        ids[b, e:e + span] = ids[b, s:s + span]
        mask[b, e + 1:e + span] = True  # the copy's first token is unpredictable: where it starts is random
    return ids, mask[:, 1:]


def build(args: argparse.Namespace) -> Transformer:
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      head_dim=64, max_position_embeddings=max(2048, args.length), rope=RopeConfig(theta=1e5),
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    model = Transformer(cfg)
    model.apply(init_weights)  # as `zeroc train` starts a model
    model.to(args.device).init_rope()  # RoPE tables are plain attributes: computed on the device
    return model.train()


def probe(args: argparse.Namespace) -> dict:
    """Train on repeat rows until `args.seconds` or `args.max_steps`; the log and the step where the copy's
    loss first fell below half of chance (None if it never did)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    chance, log, formed, start = math.log(VOCAB - 2), [], None, time.time()
    for step in range(args.max_steps):
        ids, mask = rows(gen, args.rows, args.length, args.span, args.offset)
        ids, mask = ids.to(args.device), mask.to(args.device)
        ce = F.cross_entropy(model(ids[:, :-1]).float().transpose(1, 2), ids[:, 1:], reduction="none")  # [n, T-1]
        opt.zero_grad(set_to_none=True)
        ce.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.max_steps - 1:
            copy, rest = ce[mask].mean().item(), ce[~mask].mean().item()
            log.append({"step": step, "seconds": round(time.time() - start, 1), "copy_loss": copy, "other_loss": rest})
            if not args.quiet:
                print(f"step {step} {log[-1]['seconds']:.0f} s: copy {copy:.2f} other {rest:.2f} (chance {chance:.2f})",
                      file=sys.stderr, flush=True)
            if formed is None and copy < chance / 2:
                formed = step
        if time.time() - start > args.seconds:
            break
    params = sum(p.numel() for p in model.parameters())
    return {"offset": args.offset, "parameters": params, "steps": step + 1,
            "tokens": (step + 1) * args.rows * args.length, "seconds": round(time.time() - start, 1),
            "chance": chance, "formed_at_step": formed, "log": log}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offset", choices=["random", "fixed"], default="random")
    ap.add_argument("--seconds", type=float, default=900.0)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--span", type=int, default=48)
    ap.add_argument("--length", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.length < 2 * args.span + 1 or args.span < 2:
        raise SystemExit(f"--length must be at least 2 x --span + 1 and --span at least 2, got {args.length}, "
                         f"{args.span}")
    res = probe(args)
    print(f"{res['parameters'] / 1e6:.1f}M parameters, offset {res['offset']}: {res['steps']} steps, "
          f"{res['tokens'] / 1e6:.2f}M tokens, {res['seconds']:.0f} s; induction "
          + (f"formed at step {res['formed_at_step']}" if res["formed_at_step"] is not None else "not formed"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
