"""Completions' `echo`: each choice's text begins with the prompt, and with `logprobs` its logprobs object begins
with the prompt's tokens (the first one's entries null, as OpenAI's: it has no context).

The prompt's log-probabilities come from the decode service (`prompt_logprobs`), which computes such a prompt
whole, reusing no cached prefix. `max_tokens: 0` with `echo` scores the prompt alone, which is how scorers such as
lm-evaluation-harness ask for a text's log-likelihood: the service generates one token, which is dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import AsyncIterator

from zeroc.client import Chunk, Result


@dataclass(frozen=True)
class Echo:
    """One request's echo: the prompt's text, and whether the prompt alone is wanted (`max_tokens: 0`)."""

    text: str
    only: bool = False

    async def wrap(self, first: Chunk | Result, stream: AsyncIterator[Chunk | Result]
                   ) -> tuple[Chunk, AsyncIterator[Chunk | Result]]:
        """A choice's opened stream as (its first item, the rest): the prompt's chunk first, holding the prompt's
        text and, once they have all come, its tokens' entries; where `only`, no generated token follows."""
        ids, entries, item = [], [], first
        try:
            while isinstance(item, Chunk) and item.prompt_token_ids:
                ids += item.prompt_token_ids
                entries += item.prompt_logprobs
                item = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return Chunk([], self.text, [], ids, entries), self._rest(item, stream)

    async def _rest(self, item: Chunk | Result, stream: AsyncIterator[Chunk | Result]
                    ) -> AsyncIterator[Chunk | Result]:
        try:
            while isinstance(item, Chunk):
                if not self.only:
                    yield item
                item = await stream.__anext__()
            # the prompt alone: the token generated to score it is not the client's
            yield dataclasses.replace(item, finish_reason="length", usage=dataclasses.replace(
                item.usage, completion_tokens=0)) if self.only else item
        finally:
            await stream.aclose()


async def wrap_all(echoes: list[Echo], opened: list[tuple[Chunk | Result, AsyncIterator[Chunk | Result]]]
                   ) -> list[tuple[Chunk, AsyncIterator[Chunk | Result]]]:
    """`Echo.wrap` each choice's stream with its prompt's echo; if one fails, every stream is closed and its error
    raised."""
    out = []
    try:
        for echo, (first, stream) in zip(echoes, opened):
            out.append(await echo.wrap(first, stream))
    except BaseException:
        for _, stream in opened[len(out):]:
            await stream.aclose()
        for _, rest in out:
            await rest.aclose()
        raise
    return out
