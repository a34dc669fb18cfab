"""Structured output: each guided request's next-token mask, built on the host and applied on the device.

A `Guide` (zeroc.sampling) compiles, against the model's vocabulary, to a grammar (xgrammar, the library vLLM and
SGLang use); each guided request holds a matcher of it, which says after every token which tokens may come next,
as a bitmask of 32 tokens an int32. A step fills the guided rows' bitmasks on the host, sends them to the device in
one copy (with the rows they belong to), and sets every token a row's bitmask excludes to the lowest finite score
before sampling (not -inf, which the samplers read as a broken row), whose weight exp(lowest - max) is 0: greedy and
random rows alike can only pick tokens that keep the text matching (the log-probabilities a request
asks for stay the model's, as vLLM's do). Once its token is on the host, each matcher takes it; a matcher that has
reached its end (the grammar is complete and the model chose to stop) finishes the request.

The mask is applied by the model's attention backend (kernels/token_bitmask.py: torch ops, one Triton kernel, or
one C++ call on the cpu backend), in place on the scores when nothing reads them after sampling. A guided
request's next mask needs its last token, so an engine does not launch a step past one still in flight
(zeroc/engine.py `step`).

JSON guides are compiled without free whitespace (vLLM's `disable_any_whitespace`, whose compact separators they
take too): a model that may put any whitespace anywhere can fill its whole budget with newlines, as small models do.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Callable

import torch
from torch import Tensor

from zeroc.sampling import Guide
from zeroc.tokenizer import Tokenizer
from zeroc_kernels.token_bitmask import apply_token_bitmask_ref

ApplyBitmask = Callable[[Tensor, Tensor, int], None]

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
# Compiled grammars kept (least recently used go first): clients choose the schemas, so the cache must be bounded.
CACHE_BYTES = 256 << 20


class GuideError(ValueError):
    """A guide that does not compile: a schema, regex or grammar that is invalid or that xgrammar cannot take."""


class GuideCompiler:
    """Compiles guides for one tokenizer and model vocabulary; compiled grammars are cached (by xgrammar) so a
    request's guide compiles once, when a service checks it, and `Engine.add_request` takes its matcher from the cache
    (`start`: one lookup).
    xgrammar is imported on the first guide: a service that is never asked for one never loads it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: tuple[int, ...] = (),
                 apply: ApplyBitmask = apply_token_bitmask_ref):
        """`apply`: how a step's mask is applied, (scores [B, V] in place, packed bitmasks and rows, r) -> None; the
        engine passes its model's backend's (kernels/token_bitmask.py)."""
        self.tokenizer, self.vocab_size, self.stop_ids, self.apply = tokenizer, vocab_size, stop_ids, apply
        self._compiler: Any = None
        self._filler: Any = None  # xgrammar's BatchGrammarMatcher: fills a step's bitmasks on several threads
        self._building = threading.Lock()  # a service's handler threads check guides at once

    def _xgr(self) -> Any:
        import xgrammar

        with self._building:
            if self._compiler is None:
                self._compiler = self._build(xgrammar)
                # as many threads as the engine's ops use: on a GPU the fill overlaps the forward it follows
                self._filler = xgrammar.BatchGrammarMatcher(max_threads=max(1, torch.get_num_threads()))
        return xgrammar

    def _build(self, xgrammar: Any) -> Any:
        """The grammar compiler of this vocabulary."""
        backend = self.tokenizer.backend
        vocab = backend.get_vocab(with_added_tokens=True)
        pieces = [""] * (max(vocab.values()) + 1)
        for piece, token_id in vocab.items():
            pieces[token_id] = piece
        # how the pieces spell bytes (byte-level BPE, SentencePiece byte fallback, raw), read from tokenizer.json as
        # xgrammar's own TokenizerInfo.from_huggingface reads it (which needs a transformers tokenizer object)
        spec = backend.to_str()
        meta = xgrammar.TokenizerInfo._detect_metadata_from_hf(spec)
        space = (json.loads(spec).get("decoder") or {}).get("replacement")
        if meta["vocab_type"] == xgrammar.VocabType.RAW and space:  # a bare Metaspace decoder: "▁" spells a space
            pieces = [p.replace(space, " ") for p in pieces]
        info = xgrammar.TokenizerInfo(pieces[: self.vocab_size], vocab_type=meta["vocab_type"],
                                      vocab_size=self.vocab_size, stop_token_ids=list(self.stop_ids) or None,
                                      add_prefix_space=meta["add_prefix_space"])
        return xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_BYTES)

    def compile(self, guide: Guide) -> Any:
        """The guide's compiled grammar. Raises GuideError with what is wrong in it."""
        xgr = self._xgr()
        c = self._compiler
        try:
            if guide.kind in ("json", "json_schema"):
                schema = guide.spec if guide.kind == "json_schema" else '{"type": "object"}'
                return c.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
            if guide.kind == "regex":
                return c.compile_regex(guide.spec)
            if guide.kind == "choice":  # each a GBNF string literal: JSON's escapes are GBNF's (not \u surrogates)
                literals = (json.dumps(s, ensure_ascii=False) for s in guide.choices)
                return c.compile_grammar("root ::= " + " | ".join(literals))
            return c.compile_grammar(guide.spec)
        except (RuntimeError, ValueError, xgr.InvalidJSONError) as exc:
            first = _LOG_PREFIX.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GuideError(f"guide: the {guide.kind.replace('_', ' ')} does not compile: {first[:300]}") from None

    def start(self, guide: Guide) -> tuple[Any, int | None]:
        """(a fresh matcher of the guide, the token it starts after or None): what a request needs, with the guide
        compiled once. Raises GuideError, as `compile` and `after_token`."""
        after = self.after_token(guide)
        return self._xgr().GrammarMatcher(self.compile(guide)), after

    def after_token(self, guide: Guide) -> int | None:
        """The token the guide starts after (`Guide.after`), or None where it applies from the first token. Raises
        GuideError unless `after` is exactly one token of the vocabulary (an added token such as "</think>")."""
        if not guide.after:
            return None
        ids = self.tokenizer.encode(guide.after, add_special_tokens=False)
        if len(ids) != 1 or not 0 <= ids[0] < self.vocab_size:
            raise GuideError(f"guide: after {guide.after[:64]!r} is {len(ids)} tokens of this model's vocabulary; "
                             "it must be one")
        return ids[0]

    def mask(self, scores: Tensor, matchers: list[Any], copy: bool = True) -> Tensor:
        """`scores` [B, vocab] with every token a row's matcher (None: an unguided row) excludes set to the lowest
        finite score, by `apply` (an attention backend's `apply_token_bitmask`): in a copy, or in place where `copy`
        is False (the caller reads these scores no more). `scores` itself when no row is guided."""
        guided = [(row, m) for row, m in enumerate(matchers) if m is not None]
        if not guided:
            return scores
        r, words = len(guided), -(-self.vocab_size // 32)
        # [R * words + R] int32: the guided rows' bitmasks, then their row indices, so one copy carries both
        host = torch.empty(r * words + r, dtype=torch.int32, pin_memory=scores.is_cuda)
        self._filler.batch_fill_next_token_bitmask([m for _, m in guided], host[: r * words].view(r, words))
        host[r * words:] = torch.tensor([row for row, _ in guided], dtype=torch.int32)
        scores = scores.clone() if copy else scores
        self.apply(scores, host.to(scores.device, non_blocking=True), r)
        return scores
