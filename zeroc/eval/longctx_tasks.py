"""Synthetic long-context tasks built from held-out text, deterministic under a seed.

Every sample is a haystack of held-out tokens (a random stretch of the evaluation text) with one or more
needles inserted at chosen depths, followed by a question whose answer is written in a needle. The
prompts are completions, not instructions (the bundled models are base models): the question ends with
the phrase that precedes the answer in the needle, so a model that retrieves copies the answer next.

Tasks (`TASKS`):
- passkey: one pass key at a depth of 10-90% (RULER's needle in a haystack);
- multikey: four "special magic numbers" for four words, one asked (RULER's multi-key retrieval);
- vartrack: a value assigned to a variable and passed along a chain of three assignments spread through
  the document, plus a distractor chain; the last variable's value is asked (RULER's variable tracking);
- fact: a fact stated early in the document (depth 2-10%), asked at the end.

Needles are tokenized on their own and spliced between haystack tokens, so the answer's text is in
the prompt whatever the tokenizer does at the seams; `Sample.answer` is checked on decoded text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from zeroc.tokenizer import Tokenizer

TASKS = ("passkey", "multikey", "vartrack", "fact")
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # cycled over a task's samples
WORDS = ("apple", "river", "falcon", "marble", "violet", "harbor", "copper", "meadow", "lantern", "glacier",
         "pepper", "saddle", "thunder", "walnut", "orchid", "canyon", "velvet", "ember", "quartz", "willow",
         "badger", "cobalt", "juniper", "sparrow", "tundra", "saffron", "granite", "ripple", "beacon", "nectar")


@dataclass(frozen=True)
class Sample:
    task: str
    ctx: int  # prompt length in tokens (<s> included)
    depth: float  # where the asked needle sits, as a fraction of the haystack
    prompt: tuple[int, ...]  # token ids, <s> first
    answer: str  # the text the greedy continuation must start with (leading space stripped)
    max_new: int  # tokens to generate: the answer's tokens and a margin


@dataclass(frozen=True)
class _Spec:
    needles: list[tuple[float, str]]  # (depth in [0, 1], text)
    question: str
    answer: str
    depth: float


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _passkey(rng: random.Random, index: int) -> _Spec:
    key, depth = _number(rng, 5), PASSKEY_DEPTHS[index % len(PASSKEY_DEPTHS)]
    return _Spec([(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
                 "What is the pass key? The pass key is", key, depth)


def _multikey(rng: random.Random, index: int) -> _Spec:
    words = rng.sample(WORDS, 4)
    values = [_number(rng, 7) for _ in words]
    depths = [rng.uniform(0.1, 0.9) for _ in words]
    asked = rng.randrange(len(words))
    needles = [(d, f"One of the special magic numbers for {w} is: {v}.") for d, w, v in zip(depths, words, values)]
    return _Spec(needles, f"What is the special magic number for {words[asked]}? The special magic number for "
                          f"{words[asked]} is:", values[asked], depths[asked])


def _vartrack(rng: random.Random, index: int) -> _Spec:
    names = [_var(rng) for _ in range(8)]
    value, other = _number(rng, 5), _number(rng, 5)
    needles = []
    for chain, val in ((names[:4], value), (names[4:], other)):  # the asked chain and a distractor
        depths = sorted(rng.uniform(0.1, 0.9) for _ in chain)
        needles.append((depths[0], f"VAR {chain[0]} = {val}."))
        needles += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
    first = min(d for d, t in needles if t.startswith(f"VAR {names[0]} ="))
    return _Spec(needles, f"VAR {names[3]} holds the value of VAR {names[0]}, which is", value, first)


def _fact(rng: random.Random, index: int) -> _Spec:
    word, depth = rng.choice(WORDS).capitalize(), rng.uniform(0.02, 0.1)
    return _Spec([(depth, f"Note: the secret project described in this document is called {word}.")],
                 "What is the secret project in this document called? The secret project is called", word, depth)


_BUILDERS = {"passkey": _passkey, "multikey": _multikey, "vartrack": _vartrack, "fact": _fact}


def make_sample(tokenizer: Tokenizer, haystack: list[int], task: str, ctx: int, index: int, seed: int) -> Sample:
    """Sample `index` of `task` at `ctx` prompt tokens: a deterministic function of its arguments."""
    if task not in _BUILDERS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    rng = random.Random(f"{seed}:{task}:{ctx}:{index}")  # str seeds hash the same in every process
    spec = _BUILDERS[task](rng, index)
    needles = [(d, tokenizer.encode(f"\n{text}\n", add_special_tokens=False)) for d, text in spec.needles]
    question = tokenizer.encode(f"\n{spec.question}", add_special_tokens=False)
    fill = ctx - 1 - len(question) - sum(len(n) for _, n in needles)
    if fill < len(needles) or len(haystack) < fill:
        raise ValueError(f"ctx {ctx} is too short for task {task} (or the held-out text has fewer than {fill} tokens)")
    start = rng.randrange(0, len(haystack) - fill + 1)
    filler = haystack[start: start + fill]
    ids, at = [tokenizer.bos_id], 0
    for depth, toks in sorted(needles, key=lambda n: n[0]):
        cut = round(depth * fill)
        ids += filler[at:cut] + toks
        at = cut
    ids += filler[at:] + question
    answer_tokens = len(tokenizer.encode(" " + spec.answer, add_special_tokens=False))
    return Sample(task, len(ids), spec.depth, tuple(ids), spec.answer, answer_tokens + 2)


def make_samples(tokenizer: Tokenizer, haystack: list[int], tasks: tuple[str, ...], contexts: tuple[int, ...],
                 per_cell: int, seed: int) -> list[Sample]:
    """`per_cell` samples of every task at every context length (passkey depths cycle over 10-90%)."""
    return [make_sample(tokenizer, haystack, t, c, i, seed) for t in tasks for c in contexts for i in range(per_cell)]


def is_correct(sample: Sample, text: str) -> bool:
    """Whether the greedy continuation `text` starts with the answer (surrounding space ignored)."""
    return text.strip().startswith(sample.answer)


def clip_contexts(contexts: tuple[int, ...], max_positions: int, margin: int = 16) -> tuple[int, ...]:
    """Context lengths the model can take with room to generate an answer (duplicates after clipping dropped)."""
    return tuple(dict.fromkeys(min(c, max_positions - margin) for c in contexts))
