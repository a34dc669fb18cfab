"""Synthetic long-range training sequences: facts planted in training text, recalled at the end.

A model that has only read prose barely uses distant context (the bundled 12.6M model loses 0.25%
perplexity when three quarters of its cache is dropped), so KV compression cannot be judged on it.
Mixing a fraction of sequences whose last tokens can only be predicted from far back teaches
retrieval: the haystack is a random stretch of the training stream, the planted lines sit at random
depths, and the sequence ends with a cue followed by the answer (plain next-token loss trains it).

Kinds (`KINDS`): copy (a random span of the haystack is marked and repeated), repeat (the same with up to
half the row of tokens drawn uniformly from the vocabulary: only copying predicts them, which is what forms
induction heads fastest; the bundled 12.6M model has none), kv (several keys with
numbers, one asked), passkey (one number, asked), hop (a value passed along a chain of boxes, the
last one asked: multi-hop). Held-out evaluation (`zeroc eval longctx`) builds its haystacks from the
held-out text, which training never reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zeroc.tokenizer import Tokenizer

KINDS = ("copy", "repeat", "kv", "passkey", "hop")
# Key words of the kv and hop tasks: none of them is among the words `zeroc eval longctx` asks about, so
# its multi-key task tests retrieval by unseen keys.
_NAMES = ("north", "amber", "cedar", "delta", "elm", "fjord", "grove", "heron", "ivory", "jasper", "kestrel",
          "linen", "maple", "nova", "opal", "pine", "quill", "raven", "slate", "topaz", "umber", "vale",
          "acorn", "birch", "candle", "dune", "comet", "garnet", "hazel", "iris", "jade", "kettle", "lotus",
          "mango", "nickel", "olive", "pebble", "lagoon", "rocket", "silver", "tulip", "violin", "wagon",
          "yarrow", "zephyr", "anchor", "bramble", "clover", "dahlia", "ferret", "ginger", "harp", "indigo",
          "lemon", "mirror", "onyx", "prism", "salmon", "thistle", "cricket", "island", "pilot", "cabin")


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _plan(kind: str, rng: random.Random, span: list[int], tok: Tokenizer, length: int
          ) -> tuple[list[str | list[int]], str | list[int], str | list[int], str]:
    """(planted pieces, cue, answer, text after it) of one kind; pieces, cue and answer are text or token ids.
    The cue and the answer are tokenized apart, as `zeroc eval longctx` prompts end at the cue and the
    model generates the answer: byte-level BPE splits " 12345" from the word before it either way."""
    if kind == "copy":
        marked = tok.encode("\nMemorise this passage: ", add_special_tokens=False) + span
        return [marked], "The memorised passage was:", span, "\n"
    if kind == "repeat":  # tokens in random order: nothing but an induction head predicts the second copy
        marked = tok.encode("\nMemorise these tokens: ", add_special_tokens=False) + span
        return [marked], "The tokens were:", span, "\n"
    if kind == "kv":
        keys = rng.sample(_NAMES, rng.randint(2, max(2, min(6, length // 64))))  # short sequences: fewer keys
        vals = [_digits(rng, rng.randint(4, 7)) for _ in keys]
        asked = rng.randrange(len(keys))
        return ([f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)],
                f"What is the special magic number for {keys[asked]}? The special magic number for "
                f"{keys[asked]} is:", vals[asked], ".")
    if kind == "passkey":
        key = _digits(rng, 5)
        return [f"The pass key is {key}. Remember it. {key} is the pass key."], \
            "What is the pass key? The pass key is", key, "."
    boxes = rng.sample(_NAMES, rng.randint(2, 4))
    value = _digits(rng, 5)
    lines = [f"Box {boxes[0]} holds {value}."] + [f"Box {b} holds what box {a} holds." for a, b in zip(boxes, boxes[1:])]
    return lines, f"So box {boxes[-1]} holds", value, "."


def _tail(tok: Tokenizer, cue: str, answer: str | list[int], after: str) -> tuple[list[int], list[int]]:
    """Token ids of cue + answer + after, and the answer's (start, end) within them."""
    cue_ids = tok.encode(f"\n{cue}", add_special_tokens=False)
    ans_ids = answer if isinstance(answer, list) else tok.encode(f" {answer}", add_special_tokens=False)
    return cue_ids + ans_ids + tok.encode(after, add_special_tokens=False), [len(cue_ids), len(cue_ids) + len(ans_ids)]


def synthetic_sequence(tok: Tokenizer, stream: torch.Tensor, length: int, rng: random.Random, kind: str = ""
                       ) -> tuple[torch.Tensor, str, torch.Tensor]:
    """One training sequence of exactly `length` tokens: haystack from `stream` ([n] ids), planted
    pieces in order at random depths, the cue and answer last. `kind`: one of `KINDS` ("" draws one).
    -> ([length] ids, the answer's text, [length] bool: True on the answer's tokens)"""
    kind = kind or rng.choice(KINDS)
    at = rng.randrange(0, stream.numel() - length)
    if kind == "repeat":  # a quarter to half the row, tokens uniform over the vocabulary (<s>, </s> excluded)
        longest = max(8, length // 2 - 24)
        span = [rng.randrange(2, tok.vocab_size) for _ in range(rng.randint(min(length // 4, longest), longest))]
    else:
        span = stream[at + length // 2: at + length // 2 + rng.randint(8, max(8, min(64, length // 3)))].tolist()
    pieces, cue, answer, after = _plan(kind, rng, span, tok, length)
    ids = [p if isinstance(p, list) else tok.encode(f"\n{p}\n", add_special_tokens=False) for p in pieces]
    tail_ids, (a0, a1) = _tail(tok, cue, answer, after)
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
    mask = torch.zeros(length, dtype=torch.bool)
    mask[length - len(tail_ids) + a0: length - len(tail_ids) + a1] = True
    return torch.tensor(out, dtype=torch.long), answer if isinstance(answer, str) else tok.decode(answer), mask


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # [B, T] token ids
    answer_mask: torch.Tensor  # [B, T] bool: the synthetic rows' answer tokens
    kinds: tuple[str, ...]  # per row: a synthetic kind, or "" for plain text


def check_kind_weights(weights: tuple[float, ...]) -> None:
    """Weights of `KINDS`, in that order; () draws every kind alike."""
    if weights and (len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"kind weights must be {len(KINDS)} non-negative numbers ({', '.join(KINDS)}) "
                         f"with a positive sum, got {weights}")


def sample_batch(tok: Tokenizer, stream: torch.Tensor, batch: int, length: int, synthetic: float,
                 rng: random.Random, kind_weights: tuple[float, ...] = ()) -> Batch:
    """`batch` rows of `length` tokens: each a synthetic sequence with probability `synthetic` (its kind
    drawn by `kind_weights`, which `check_kind_weights` has checked), else a random slice of `stream`."""
    rows, masks, kinds = [], [], []
    for _ in range(batch):
        synthetic_row = rng.random() < synthetic
        kind = (rng.choices(KINDS, kind_weights)[0] if kind_weights else rng.choice(KINDS)) if synthetic_row else ""
        if kind:
            row, _, mask = synthetic_sequence(tok, stream, length, rng, kind)
        else:
            at = rng.randrange(0, stream.numel() - length)
            row, mask = stream[at: at + length], torch.zeros(length, dtype=torch.bool)
        rows.append(row)
        masks.append(mask)
        kinds.append(kind)
    return Batch(torch.stack(rows), torch.stack(masks), tuple(kinds))
