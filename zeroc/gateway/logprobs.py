"""OpenAI's `logprobs` objects, built from the per-token log-probabilities a decode service streams.

Chat completions (`logprobs: true`, `top_logprobs: n`) get `{"content": [{token, logprob, bytes,
top_logprobs: [n x {token, logprob, bytes}]}], "refusal": null}`; completions (`logprobs: n`) get the
legacy `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`, whose dicts also hold the
generated token (OpenAI's "up to logprobs + 1" entries); with `echo` the prompt's tokens come first, the first of
them with null entries (zeroc/gateway/echo.py). A token's text is what it prints alone (U+FFFD
where it holds part of a character) and `bytes` its whole bytes. The values are the model's own
log-probabilities, before temperature and the top-k/top-p cuts (protos/zeroc/v1/generation.proto).
"""

from __future__ import annotations

from zeroc.client import TokenLogprob
from zeroc.tokenizer import Tokenizer


class LogprobFormat:
    """One request's logprobs objects; its stream's chunks share one, which carries each choice's text offset."""

    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.offsets: dict[int, int] = {}  # choice -> completions' text_offset of its next token, in characters

    def _entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokenizer.token_text(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token_id))}

    def render(self, token_ids: list[int], logprobs: list[TokenLogprob], index: int = 0,
               prompt: tuple[list[int], list[TokenLogprob]] | None = None) -> dict:
        """The `logprobs` of choice `index` (or of its stream chunk) holding these tokens: one log-probability per
        id; after the prompt's (its ids, and one entry per id from the second) where completions echo it."""
        if self.chat:
            content = [{**self._entry(t, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top]}
                       for t, lp in zip(token_ids, logprobs)]
            return {"content": content, "refusal": None}
        pairs: list[tuple[int, TokenLogprob | None]] = list(zip(token_ids, logprobs))
        if prompt is not None:
            pairs = list(zip(prompt[0], [None, *prompt[1]])) + pairs
        tokens = [self.tokenizer.token_text(t) for t, _ in pairs]
        offsets, at = [], self.offsets.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self.offsets[index] = at
        tops = [None if lp is None else {**{self.tokenizer.token_text(i): v for i, v in lp.top}, text: lp.logprob}
                for text, (_, lp) in zip(tokens, pairs)]
        return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for _, lp in pairs],
                "top_logprobs": tops, "text_offset": offsets}
