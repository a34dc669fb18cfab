"""OpenAI's `logprobs` objects, built from the per-token log-probabilities a decode service streams.

Chat completions (`logprobs: true`, `top_logprobs: n`) get `{"content": [{token, logprob, bytes,
top_logprobs: [n x {token, logprob, bytes}]}], "refusal": null}`; completions (`logprobs: n`) get the
legacy `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`, whose dicts also hold the
generated token (OpenAI's "up to logprobs + 1" entries). A token's text is what it prints alone (U+FFFD
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

    def render(self, token_ids: list[int], logprobs: list[TokenLogprob], index: int = 0) -> dict:
        """The `logprobs` of choice `index` (or of its stream chunk) holding these tokens: one log-probability per
        id."""
        if self.chat:
            content = [{**self._entry(t, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top]}
                       for t, lp in zip(token_ids, logprobs)]
            return {"content": content, "refusal": None}
        tokens = [self.tokenizer.token_text(t) for t in token_ids]
        offsets, at = [], self.offsets.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self.offsets[index] = at
        tops = [{**{self.tokenizer.token_text(i): v for i, v in lp.top}, text: lp.logprob}
                for text, lp in zip(tokens, logprobs)]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": tops,
                "text_offset": offsets}
