"""Synthetic long-range training sequences: facts planted in training text, recalled at the end.

A model that has only read prose barely uses distant context (the bundled 12.6M model loses 0.25%
perplexity when three quarters of its cache is dropped), so KV compression cannot be judged on it.
Mixing a fraction of sequences whose last tokens can only be predicted from far back teaches
retrieval: the haystack is a random stretch of the training stream, the planted lines sit at random
depths, and the sequence ends with a cue followed by the answer (plain next-token loss trains it).

Kinds (`KINDS`): copy (a random span of the haystack is marked and repeated), kv (several keys with
numbers, one asked), passkey (one number, asked), hop (a value passed along a chain of boxes, the
last one asked: multi-hop). Held-out evaluation (`zeroc eval longctx`) builds its haystacks from the
held-out text, which training never reads.
"""

from __future__ import annotations

import random

import torch

from zeroc.tokenizer import Tokenizer

KINDS = ("copy", "kv", "passkey", "hop")
_NAMES = ("north", "amber", "cedar", "delta", "ember", "fjord", "grove", "heron", "ivory", "jasper", "kestrel",
          "linen", "maple", "nova", "opal", "pine", "quill", "raven", "slate", "topaz", "umber", "vale")


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _plan(kind: str, rng: random.Random, span: list[int], tok: Tokenizer
          ) -> tuple[list[str | list[int]], str | list[int], str]:
    """(planted pieces, cue + answer, answer) of one kind; pieces are text or token ids."""
    if kind == "copy":
        marked = tok.encode("\nMemorise this passage: ", add_special_tokens=False) + span
        return [marked], tok.encode("\nThe memorised passage was: ", add_special_tokens=False) + span, tok.decode(span)
    if kind == "kv":
        keys = rng.sample(_NAMES, rng.randint(2, 6))
        vals = [_digits(rng, rng.randint(4, 7)) for _ in keys]
        asked = rng.randrange(len(keys))
        return ([f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)],
                f"What is the special magic number for {keys[asked]}? The special magic number for "
                f"{keys[asked]} is: {vals[asked]}.", vals[asked])
    if kind == "passkey":
        key = _digits(rng, 5)
        return ([f"The pass key is {key}. Remember it. {key} is the pass key."],
                f"What is the pass key? The pass key is {key}.", key)
    boxes = rng.sample(_NAMES, rng.randint(2, 4))
    value = _digits(rng, 5)
    lines = [f"Box {boxes[0]} holds {value}."] + [f"Box {b} holds what box {a} holds." for a, b in zip(boxes, boxes[1:])]
    return lines, f"So box {boxes[-1]} holds {value}.", value


def synthetic_sequence(tok: Tokenizer, stream: torch.Tensor, length: int, rng: random.Random
                       ) -> tuple[torch.Tensor, str]:
    """One training sequence of exactly `length` tokens: haystack from `stream` ([n] ids), planted
    pieces in order at random depths, the cue and answer last. -> ([length], the answer's text)"""
    kind = rng.choice(KINDS)
    at = rng.randrange(0, stream.numel() - length)
    span = stream[at + length // 2: at + length // 2 + rng.randint(8, 32)].tolist()
    pieces, tail, answer = _plan(kind, rng, span, tok)
    ids = [p if isinstance(p, list) else tok.encode(f"\n{p}\n", add_special_tokens=False) for p in pieces]
    tail_ids = tail if isinstance(tail, list) else tok.encode(f"\n{tail}", add_special_tokens=False)
    fill = length - len(tail_ids) - sum(len(p) for p in ids)
    if fill < 1:
        raise ValueError(f"length {length} is too short for a {kind} sequence")
    filler = stream[at: at + fill].tolist()
    cuts = sorted(rng.randrange(0, max(1, int(fill * 0.9))) for _ in ids)  # the last tenth stays plain text
    out, prev = [], 0
    for cut, piece in zip(cuts, ids):
        out += filler[prev:cut] + piece
        prev = cut
    out += filler[prev:] + tail_ids
    return torch.tensor(out, dtype=torch.long), answer


def sample_batch(tok: Tokenizer, stream: torch.Tensor, batch: int, length: int, synthetic: float,
                 rng: random.Random) -> torch.Tensor:
    """`batch` rows of `length` tokens: each a synthetic sequence with probability `synthetic`, else a
    random slice of `stream`. -> [batch, length]"""
    rows = []
    for _ in range(batch):
        if rng.random() < synthetic:
            rows.append(synthetic_sequence(tok, stream, length, rng)[0])
        else:
            at = rng.randrange(0, stream.numel() - length)
            rows.append(stream[at: at + length])
    return torch.stack(rows)
